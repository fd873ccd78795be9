"""The server's side of a round: average the sites' updates, weighted by their images, and apply the result."""

from __future__ import annotations

from typing import Sequence

import torch

from medpfl.errors import MedPFLError


def weighted_average(updates: dict[str, torch.Tensor],
                     n_images: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
    """FedAvg: sum_s n_s * update_s / sum_s n_s, for updates stacked as name -> S x (parameter shape)."""
    weights = torch.as_tensor(n_images, dtype=torch.float64)
    if weights.dim() != 1 or (weights < 0).any() or weights.sum() <= 0:
        raise MedPFLError("Aggregation needs one non-negative image count per site, and at least one image.")
    out = {}
    for name, stacked in updates.items():
        if stacked.shape[0] != len(weights):
            raise MedPFLError(f"Update '{name}' holds {stacked.shape[0]} sites but {len(weights)} counts were given.")
        w = (weights / weights.sum()).to(stacked.dtype).to(stacked.device)
        out[name] = torch.tensordot(w, stacked, dims=1)
    return out


def apply_update(weights: dict[str, torch.Tensor], aggregated: dict[str, torch.Tensor], protocol: str,
                 lr: float) -> dict[str, torch.Tensor]:
    """The next global weights: a gradient step of size `lr` (fedsgd), or the averaged weight change (fedavg)."""
    if protocol == "fedsgd":
        return {n: w - lr * aggregated[n] for n, w in weights.items()}
    return {n: w + aggregated[n] for n, w in weights.items()}
