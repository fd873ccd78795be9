"""k-bit uniform quantization with stochastic (unbiased) rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medpfl.defenses.base import Defense, Update, draw_like


@dataclass
class Quantize(Defense):
    """Map each layer of each site's update onto 2^bits evenly spaced levels between its min and max.

    Stochastic rounding (default) rounds up with probability equal to the remainder, so the expected
    quantized value is the original (unbiased); `stochastic=False` rounds to the nearest level."""

    bits: int = 8
    stochastic: bool = True
    name = "quant"
    stage = "quantize"

    def __call__(self, update: Update, generator: torch.Generator) -> Update:
        levels = 2 ** self.bits - 1
        out = {}
        for name, t in update.items():
            rows = t.reshape(t.shape[0], -1)
            low, high = rows.min(1, keepdim=True).values, rows.max(1, keepdim=True).values
            step = ((high - low) / levels).clamp(min=torch.finfo(t.dtype).tiny)
            position = (rows - low) / step
            if self.stochastic:
                position = position.floor() + (draw_like(position, generator, "uniform") < position.frac()).to(t.dtype)
            else:
                position = position.round()
            out[name] = (low + position.clamp(0, levels) * step).reshape(t.shape)
        return out
