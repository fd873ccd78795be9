"""How far a candidate's gradient is from the observed one, and image priors."""

from __future__ import annotations

import torch


def l2_distance(candidate: dict[str, torch.Tensor], observed: dict[str, torch.Tensor]) -> torch.Tensor:
    """DLG's objective: the sum over layers of squared L2 gradient differences."""
    return sum(((candidate[n] - observed[n]) ** 2).sum() for n in observed)


def cosine_distance(
    candidate: dict[str, torch.Tensor], observed: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Inverting Gradients' objective: 1 - cosine similarity of the (weighted) layer gradients."""
    dot = sum((weights[n] * candidate[n] * observed[n]).sum() for n in observed)
    cand_norm = sum((weights[n] * candidate[n] ** 2).sum() for n in observed)
    obs_norm = sum((weights[n] * observed[n] ** 2).sum() for n in observed)
    return 1 - dot / (cand_norm.clamp_min(1e-20).sqrt() * obs_norm.clamp_min(1e-20).sqrt())


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (anisotropic TV) of a B x C x H x W batch."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


def top_layer_weights(observed: dict[str, torch.Tensor], top: int | None) -> dict[str, torch.Tensor]:
    """Per victim, weight 1 on the `top` parameter tensors with the largest gradient norm, 0 elsewhere.

    Computed from the observed update alone, as Inverting Gradients does on untrained networks. V each.
    """
    names = list(observed)
    norms = torch.stack([observed[n].flatten(1).norm(dim=1) for n in names], dim=1)  # V x L
    if top is None or top >= len(names):
        chosen = torch.ones_like(norms)
    else:
        chosen = torch.zeros_like(norms).scatter(1, norms.topk(top, dim=1).indices, 1.0)
    return {n: chosen[:, i] for i, n in enumerate(names)}
