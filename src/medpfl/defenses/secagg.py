"""Secure aggregation's outcome: the server sees only the mean of K sites' updates, none alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medpfl.defenses.base import Defense, Update


@dataclass
class SecureAggregation(Defense):
    """Average consecutive groups of `k` sites (dim 0 holds groups x k sites): what the server observes.

    Simulates the result of a secure-aggregation protocol in-process; an attack then faces one update
    of k x B images."""

    k: int = 2
    name = "secagg"
    stage = "channel"

    def __call__(self, update: Update, generator: torch.Generator) -> Update:
        sites = next(iter(update.values())).shape[0]
        if sites % self.k:
            raise ValueError(f"secure aggregation over k={self.k} sites needs a multiple of k updates, got {sites}")
        return {name: t.reshape(sites // self.k, self.k, *t.shape[1:]).mean(1) for name, t in update.items()}
