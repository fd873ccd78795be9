"""Plain noise on every entry of each site's update: the paper's Laplace defense and its Gaussian twin.

Neither claims an epsilon: without clipping the update's sensitivity is unbounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medpfl.defenses.base import Defense, Update, draw_like


@dataclass
class LaplaceNoise(Defense):
    """Add i.i.d. Laplace(0, b) noise to every entry (the paper's defense, b in {0.01 ... 0.0025})."""

    b: float = 0.01
    name = "laplace"
    stage = "noise"

    def __call__(self, update: Update, generator: torch.Generator) -> Update:
        # Laplace(0, b) by inversion: -b sign(u) log(1 - 2|u|) for u uniform on [-1/2, 1/2). The draw u = -1/2
        # (probability 2^-24 an entry in float32, so about once in a few rounds of a ConvNet's updates) would give
        # log(0) = -inf and a NaN model: it stands for the lowest bin of width eps, taken at its midpoint.
        out = {}
        for name, t in update.items():
            u = draw_like(t, generator, "uniform") - 0.5
            tail = torch.log1p(-2 * u.abs()).clamp_min(math.log(torch.finfo(t.dtype).eps / 2))
            out[name] = t - self.b * torch.sign(u) * tail
        return out


@dataclass
class GaussianNoise(Defense):
    """Add i.i.d. N(0, sigma^2) noise to every entry."""

    sigma: float = 0.01
    name = "gaussian"
    stage = "noise"

    def __call__(self, update: Update, generator: torch.Generator) -> Update:
        return {name: t + self.sigma * draw_like(t, generator, "normal") for name, t in update.items()}
