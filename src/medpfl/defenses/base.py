"""What every defense shares: an update is a dict name -> tensor stacked over sites (dim 0 indexes the site)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

Update = dict[str, torch.Tensor]

# Where a defense acts in a round, in the order they are applied (DESIGN: clip -> noise -> sparsify -> quantize,
# then the channel). Local training (DP-SGD) changes how the update is computed, before all of these;
# client-level DP clips at the site and adds its noise in the server's aggregation, after all of them.
STAGES = ("local", "clip", "noise", "sparsify", "quantize", "channel", "server")
SPEC_KEYS = {"noise_multiplier": "noise", "sample_rate": "rate"}  # constructor arguments whose spec key is shorter


@dataclass
class Defense:
    """A transform of each site's update; subclasses set `name` and `stage` and implement `__call__`."""

    name = "none"
    stage = "noise"

    def __call__(self, update: Update, generator: torch.Generator) -> Update:
        return update

    def config(self) -> dict[str, Any]:
        """The defense's name and parameters, for run records."""
        return {"defense": self.name, **asdict(self)}

    def label(self) -> str:
        """A short label such as 'laplace:b=0.01': the first parameter, and any other not at its default."""
        shown = [(f.name, getattr(self, f.name)) for i, f in enumerate(fields(self))
                 if getattr(self, f.name) is not None and (i == 0 or getattr(self, f.name) != f.default)]
        params = ",".join(f"{SPEC_KEYS.get(k, k)}={v:g}" if isinstance(v, float) else f"{SPEC_KEYS.get(k, k)}={v}"
                          for k, v in shown)
        return f"{self.name}:{params}" if params else self.name


def flatten_sites(update: Update) -> torch.Tensor:
    """Each site's whole update as one row: S x (number of entries)."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in update.values()], dim=1)


def unflatten_sites(flat: torch.Tensor, like: Update) -> Update:
    """Inverse of `flatten_sites`, shaped as `like`."""
    out, start = {}, 0
    for name, t in like.items():
        size = t[0].numel()
        out[name] = flat[:, start:start + size].reshape(t.shape)
        start += size
    return out


def site_norms(update: Update) -> torch.Tensor:
    """L2 norm of each site's whole update (all tensors together): S."""
    return torch.stack([t.reshape(t.shape[0], -1).pow(2).sum(1) for t in update.values()]).sum(0).sqrt()


def draw_like(t: torch.Tensor, generator: torch.Generator, kind: str) -> torch.Tensor:
    """Standard normal ('normal') or uniform [0,1) ('uniform') draws shaped as `t`, from `generator`.

    Drawn on the generator's device and moved, so a CPU generator serves updates on any device."""
    draw = torch.randn if kind == "normal" else torch.rand
    return draw(t.shape, generator=generator, device=generator.device, dtype=t.dtype).to(t.device)
