"""Model registry: build any zoo model by name, reproducibly from a seed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medpfl.errors import MedPFLError
from medpfl.models.convnet import ConvNet
from medpfl.models.init import INIT_SCHEMES, init_weights
from medpfl.models.lenet import LeNet, lenet_feature_size
from medpfl.models.mlp import MLP
from medpfl.models.norms import NORMS
from medpfl.models.resnet import ResNet18

MODELS: dict[str, str] = {
    "lenet-dlg": "MedPFL DLG notebook's LeNet: 4 sigmoid convs (12 ch, k5, strides 2,2,1,1), Linear 768->K at 32x32 "
                 "(the DLG paper's own has 3 convs: lenet-idlg)",
    "lenet-idlg": "iDLG paper's LeNet: 3 sigmoid convs (12 ch, k5, strides 2,2,1), Linear 768->K at 32x32",
    "lenet-cpl": "CPL paper's LeNet: 6 sigmoid convs (16 ch, k2, pad 2), Linear 40000->K at 32x32",
    "convnet": "small ConvNet 32/64/128, conv3x3 + norm + ReLU + max-pool, global average pool, Linear",
    "resnet18": "ResNet-18 with a CIFAR stem (3x3 conv, no max-pool), for small images",
    "resnet18-imagenet": "ResNet-18 with the ImageNet stem (7x7 stride-2 conv + max-pool), for 224x224 images",
    "mlp": "fully connected net: Linear C*H*W->1000 + ReLU, Linear 1000->K (trap weights go in its first layer)",
}

# Smallest input side each model accepts; the LeNets check theirs from their layer arithmetic.
_MIN_IMAGE_SIZE: dict[str, int] = {"convnet": 8, "resnet18": 8, "resnet18-imagenet": 32}

_BUILDERS: dict[str, Callable[[int, int, int, str], nn.Module]] = {
    "lenet-dlg": lambda k, c, n, norm: LeNet("dlg", k, c, n),
    "lenet-idlg": lambda k, c, n, norm: LeNet("idlg", k, c, n),
    "lenet-cpl": lambda k, c, n, norm: LeNet("cpl", k, c, n),
    "convnet": lambda k, c, n, norm: ConvNet(k, c, norm=norm),
    "resnet18": lambda k, c, n, norm: ResNet18(k, c, stem="cifar", norm=norm),
    "resnet18-imagenet": lambda k, c, n, norm: ResNet18(k, c, stem="imagenet", norm=norm),
    "mlp": lambda k, c, n, norm: MLP(k, c, n),
}


def model_names() -> list[str]:
    """Names accepted by `build_model` (and `--model`)."""
    return list(MODELS)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    init: str | None = None,
    norm: str = "batch",
    seed: int = 0,
) -> nn.Module:
    """Build model `name` for square `image_size` inputs; the same arguments always give identical weights.

    `init` defaults to 'uniform' for the LeNets (as in the papers) and 'default' otherwise; LeNets and the MLP
    ignore `norm`.
    """
    if name not in MODELS:
        raise MedPFLError(f"Unknown --model '{name}'; choose one of: {', '.join(MODELS)}.")
    if norm not in NORMS:
        raise MedPFLError(f"Unknown --norm '{norm}'; choose one of: {', '.join(NORMS)}.")
    scheme = init if init is not None else ("uniform" if name.startswith("lenet") else "default")
    if scheme not in INIT_SCHEMES:
        raise MedPFLError(f"Unknown --init '{scheme}'; choose one of: {', '.join(INIT_SCHEMES)}.")
    if num_classes < 1 or in_channels < 1:
        raise MedPFLError(
            f"Model '{name}' needs at least 1 class and 1 input channel, got {num_classes} and {in_channels}."
        )
    minimum = _MIN_IMAGE_SIZE.get(name, 1)
    if image_size < minimum:
        raise MedPFLError(f"--image-size {image_size} is too small for --model {name}; use at least {minimum}.")
    if name.startswith("lenet"):
        lenet_feature_size(name.removeprefix("lenet-"), image_size)  # raises a clear error for impossible sizes
    # Module constructors draw from the global RNG; fork it so building a model leaves no trace there.
    with torch.random.fork_rng(devices=[]):
        model = _BUILDERS[name](num_classes, in_channels, image_size, norm)
    return init_weights(model, scheme, torch.Generator().manual_seed(seed))
