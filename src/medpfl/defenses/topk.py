"""Top-k magnitude sparsification (gradient compression): the paper's commented-out defense."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medpfl.defenses.base import Defense, Update, flatten_sites, unflatten_sites


@dataclass
class TopK(Defense):
    """Zero the `prune` share of smallest-magnitude entries of each site's update.

    Ranked over the whole update (all layers together), as deep gradient compression does; the
    paper's commented-out code ranked each layer separately (`per_layer=True`)."""

    prune: float = 0.9
    per_layer: bool = False
    name = "topk"
    stage = "sparsify"

    def __call__(self, update: Update, generator: torch.Generator) -> Update:
        if self.per_layer:
            return {name: _keep_largest(t.reshape(t.shape[0], -1), self.prune).reshape(t.shape)
                    for name, t in update.items()}
        return unflatten_sites(_keep_largest(flatten_sites(update), self.prune), update)


def _keep_largest(rows: torch.Tensor, prune: float) -> torch.Tensor:
    """Keep the round((1 - prune) n) largest-magnitude entries of each row (at least one), zero the rest."""
    keep = max(1, round((1 - prune) * rows.shape[1]))
    index = rows.abs().topk(keep, dim=1).indices
    return torch.zeros_like(rows).scatter(1, index, rows.gather(1, index))
