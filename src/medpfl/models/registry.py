"""Model registry: build any zoo model by name, or a user's own as `module:callable`, reproducibly from a seed.

Each zoo model is one ModelEntry (its builder, description, smallest image and default initialisation);
`register_model` adds one, and --model offers every registered name.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medpfl.errors import MedPFLError
from medpfl.models.convnet import ConvNet
from medpfl.models.init import INIT_SCHEMES, init_weights
from medpfl.models.lenet import LeNet
from medpfl.models.mlp import MLP
from medpfl.models.norms import NORMS
from medpfl.models.resnet import ResNet18
from medpfl.registry import Registry


@dataclass(frozen=True)
class ModelEntry:
    """One model of the zoo: how to build it, and what it takes."""

    name: str  # --model NAME
    build: Callable[[int, int, int, str], nn.Module]  # (classes, channels, image side, norm) -> the model
    summary: str
    min_image_size: int = 1  # the smallest input side it takes (the LeNets check theirs from their layer arithmetic)
    default_init: str = "default"  # INIT_SCHEMES name used when no --init is given


MODELS: Registry[ModelEntry] = Registry("--model")
register_model = MODELS.register  # register_model(entry): add a model to the zoo and to --model's choices


def _lenet(variant: str, summary: str) -> ModelEntry:
    # The papers' sigmoid LeNets start from U(-0.5, 0.5) ("uniform") and ignore `norm`.
    return ModelEntry(f"lenet-{variant}", lambda k, c, n, norm: LeNet(variant, k, c, n), summary,
                      default_init="uniform")


for _entry in (
    _lenet("dlg", "MedPFL DLG notebook's LeNet: 4 sigmoid convs (12 ch, k5, strides 2,2,1,1), Linear 768->K at 32x32 "
                  "(the DLG paper's own has 3 convs: lenet-idlg)"),
    _lenet("idlg", "iDLG paper's LeNet: 3 sigmoid convs (12 ch, k5, strides 2,2,1), Linear 768->K at 32x32"),
    _lenet("cpl", "CPL paper's LeNet: 6 sigmoid convs (16 ch, k2, pad 2), Linear 40000->K at 32x32"),
    ModelEntry("convnet", lambda k, c, n, norm: ConvNet(k, c, norm=norm),
               "small ConvNet 32/64/128, conv3x3 + norm + ReLU + max-pool, global average pool, Linear",
               min_image_size=8),
    ModelEntry("resnet18", lambda k, c, n, norm: ResNet18(k, c, stem="cifar", norm=norm),
               "ResNet-18 with a CIFAR stem (3x3 conv, no max-pool), for small images", min_image_size=8),
    ModelEntry("resnet18-imagenet", lambda k, c, n, norm: ResNet18(k, c, stem="imagenet", norm=norm),
               "ResNet-18 with the ImageNet stem (7x7 stride-2 conv + max-pool), for 224x224 images",
               min_image_size=32),
    ModelEntry("mlp", lambda k, c, n, norm: MLP(k, c, n),
               "fully connected net: Linear C*H*W->1000 + ReLU, Linear 1000->K (trap weights go in its first layer)"),
):
    register_model(_entry)


def model_names() -> list[str]:
    """Names accepted by `build_model` (and `--model`), besides a user's `module:callable`."""
    return list(MODELS)


def is_user_model(name: str) -> bool:
    """Whether `name` points at a user's own model constructor, as `package.module:callable`."""
    return ":" in name


def check_model_name(name: str) -> str:
    """`name` if `--model` accepts it (a zoo name or `module:callable`); else one sentence saying what to pass."""
    if name in MODELS or (is_user_model(name) and all(name.partition(":")[::2])):
        return name
    raise MedPFLError(f"Unknown --model '{name}'; choose one of: {', '.join(MODELS)}, or your own torch model "
                      "as module:callable (e.g. monai.networks.nets:DenseNet121 with --model-kwargs).")


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """`--model-kwargs` 'a=1,b=true,c=x,d=(2,2)' -> {'a': 1, 'b': True, 'c': 'x', 'd': (2, 2)}: Python
    literals (true/false/none too), anything else a string."""
    kwargs: dict[str, Any] = {}
    for part in _split_top_level(text or ""):
        key, eq, value = part.partition("=")
        if not eq or not key.strip().isidentifier():
            raise MedPFLError(f"--model-kwargs '{text}': '{part}' is not NAME=VALUE; pass e.g. "
                              "spatial_dims=2,in_channels=3,out_channels=6.")
        kwargs[key.strip()] = _literal(value.strip())
    return kwargs


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets, so '(1,2)' stays one value."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in (*parts, current) if p.strip()]


def _literal(value: str) -> Any:
    words = {"true": True, "false": False, "none": None}
    if value.lower() in words:
        return words[value.lower()]
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _user_constructor(name: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MedPFLError(f"--model {name}: cannot import '{module_name}' ({exc}); install it or fix the "
                          "module path.") from None
    constructor = module
    for part in attribute.split("."):
        constructor = getattr(constructor, part, None)
        if constructor is None:
            raise MedPFLError(f"--model {name}: '{module_name}' has no '{attribute}'.")
    if not callable(constructor):
        raise MedPFLError(f"--model {name}: '{attribute}' is not callable; point at a class or function that "
                          "returns a torch.nn.Module.")
    return constructor


def build_user_model(name: str, kwargs: dict[str, Any], num_classes: int, in_channels: int, image_size: int,
                     seed: int) -> nn.Module:
    """A user's model `module:callable` built with `kwargs`, its own initialisation drawn from `seed` (the
    global RNG is forked, so nothing else changes), and checked to map C x S x S images to `num_classes` logits."""
    constructor = _user_constructor(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = constructor(**kwargs)
        except TypeError as exc:
            raise MedPFLError(f"--model {name} does not take --model-kwargs {kwargs} ({exc}).") from None
    if not isinstance(model, nn.Module):
        raise MedPFLError(f"--model {name} returned {type(model).__name__}, not a torch.nn.Module.")
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, image_size, image_size))
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward gets the same advice
        raise MedPFLError(f"--model {name} with {kwargs} fails on {in_channels} x {image_size} x {image_size} "
                          f"images ({type(exc).__name__}: {exc}); set --model-kwargs, --channels or "
                          "--image-size to fit.") from None
    model.train()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise MedPFLError(f"--model {name} gives outputs of shape {shape} on one image, not (1, {num_classes}) "
                          f"logits for the data's {num_classes} classes; set its output size in --model-kwargs.")
    return model


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    init: str | None = None,
    norm: str = "batch",
    seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build model `name` for square `image_size` inputs; the same arguments always give identical weights.

    `init` defaults to 'uniform' for the LeNets (as in the papers) and 'default' otherwise; LeNets and the MLP
    ignore `norm`. A user's `module:callable` is built with `model_kwargs` and keeps its own initialisation
    unless `init` is given; `norm` does not apply to it.
    """
    if is_user_model(name):
        model = build_user_model(check_model_name(name), model_kwargs or {}, num_classes, in_channels, image_size,
                                 seed)
        return model if init is None else init_weights(model, init, torch.Generator().manual_seed(seed))
    if model_kwargs:
        raise MedPFLError(f"--model-kwargs apply to your own module:callable model, not to --model {name}.")
    entry = MODELS.entry(name)  # an unknown name is named, with the zoo's
    if norm not in NORMS:
        raise MedPFLError(f"Unknown --norm '{norm}'; choose one of: {', '.join(NORMS)}.")
    scheme = init if init is not None else entry.default_init
    if scheme not in INIT_SCHEMES:
        raise MedPFLError(f"Unknown --init '{scheme}'; choose one of: {', '.join(INIT_SCHEMES)}.")
    if num_classes < 1 or in_channels < 1:
        raise MedPFLError(
            f"Model '{name}' needs at least 1 class and 1 input channel, got {num_classes} and {in_channels}."
        )
    if image_size < entry.min_image_size:
        raise MedPFLError(f"--image-size {image_size} is too small for --model {name}; use at least "
                          f"{entry.min_image_size}.")
    # Module constructors draw from the global RNG; fork it so building a model leaves no trace there. A LeNet
    # refuses an image size its layers cannot take, in one sentence.
    with torch.random.fork_rng(devices=[]):
        model = entry.build(num_classes, in_channels, image_size, norm)
    return init_weights(model, scheme, torch.Generator().manual_seed(seed))
