"""Normalisation layers shared by the ConvNet and the ResNets."""

from __future__ import annotations

from torch import nn

from medpfl.errors import MedPFLError

NORMS: tuple[str, ...] = ("batch", "group", "none")


def group_count(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups: the largest divisor of `channels` not above `max_groups`."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def make_norm(kind: str, channels: int, max_groups: int = 32) -> nn.Module:
    """A 2-D normalisation layer: 'batch' (BatchNorm2d), 'group' (GroupNorm, Opacus-safe) or 'none'."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels, max_groups), channels)
    if kind == "none":
        return nn.Identity()
    raise MedPFLError(f"Unknown --norm '{kind}'; choose one of: {', '.join(NORMS)}.")
