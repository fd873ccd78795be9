"""L2 clipping of each site's whole update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medpfl.defenses.base import Defense, Update, site_norms


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale factors that bring norms down to `max_norm` (Opacus's formula, so results match it)."""
    return (max_norm / (norms + 1e-6)).clamp(max=1.0)


@dataclass
class ClipNorm(Defense):
    """Scale each site's update (all tensors together) down to L2 norm at most `norm`."""

    norm: float = 1.0
    name = "clip"
    stage = "clip"

    def __call__(self, update: Update, generator: torch.Generator) -> Update:
        factors = clip_factors(site_norms(update), self.norm)
        return {name: t * factors.reshape(-1, *[1] * (t.dim() - 1)) for name, t in update.items()}
