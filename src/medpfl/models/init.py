"""Weight initialisers drawn from an explicit torch.Generator, so the same seed gives the same model."""

from __future__ import annotations

import math

import torch
from torch import nn

from medpfl.errors import MedPFLError

INIT_SCHEMES: dict[str, str] = {
    "default": "PyTorch's own layer initialisation, drawn from the given generator",
    "uniform": "every weight and bias ~ U(-0.5, 0.5), as in the DLG/iDLG/CPL papers",
    "kaiming": "Kaiming-normal conv/linear weights (fan-out, ReLU), zero biases, unit norm scales",
}

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def _fan_in(weight: torch.Tensor) -> int:
    return weight.shape[1] * math.prod(weight.shape[2:]) if weight.dim() > 1 else weight.shape[0]


def _reset_norm(module: nn.Module) -> None:
    if getattr(module, "weight", None) is not None:
        nn.init.ones_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
        module.reset_running_stats()


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str = "default", generator: torch.Generator | None = None) -> nn.Module:
    """Re-initialise every parameter of `model` in place with `scheme`, drawing only from `generator`.

    A missing generator means seed 0, never the global RNG; returns `model` for chaining.
    """
    if scheme not in INIT_SCHEMES:
        raise MedPFLError(f"Unknown --init '{scheme}'; choose one of: {', '.join(INIT_SCHEMES)}.")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if scheme == "uniform":
        # The papers' weights_init touches every module's weight and bias; all parameters is the same thing.
        for param in model.parameters():
            nn.init.uniform_(param, -0.5, 0.5, generator=gen)
        return model
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            if scheme == "default":
                # torch's kaiming_uniform_(a=sqrt(5)) for weights and its bias rule both give U(+-1/sqrt(fan_in)).
                bound = 1.0 / math.sqrt(_fan_in(module.weight)) if _fan_in(module.weight) > 0 else 0.0
                nn.init.uniform_(module.weight, -bound, bound, generator=gen)
                if module.bias is not None:
                    nn.init.uniform_(module.bias, -bound, bound, generator=gen)
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=gen)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        elif isinstance(module, _NORM_TYPES):
            _reset_norm(module)
        elif any(True for _ in module.parameters(recurse=False)):
            # Layers we do not know: their own reset, with the global RNG forked and seeded from `gen`.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
                module.reset_parameters()  # type: ignore[operator]
    return model
