"""Client-level DP on the server: clip each site's update, add Gaussian noise to the aggregate.

As Flower's DifferentialPrivacyServerSideFixedClipping does; epsilon protects a whole site's
participation, accounted over rounds with sites sampled at rate sites_per_round / population.
A curious server still sees each clipped update before the noise, so this protects the released
model, not the updates, unless combined with secure aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medpfl.defenses.accounting import DEFAULT_DELTA, epsilon_spent
from medpfl.defenses.base import Update, draw_like
from medpfl.defenses.clip import ClipNorm


@dataclass
class ClientLevelDP:
    """Server-side aggregation with per-site clipping to `clip` and noise std `noise_multiplier * clip`."""

    noise_multiplier: float = 1.0
    clip: float = 1.0
    delta: float = DEFAULT_DELTA
    accountant: str = "rdp"

    def aggregate(self, updates: Update, generator: torch.Generator, expected_sites: int | None = None) -> Update:
        """Noisy mean of the clipped site updates (name -> S x shape in, name -> shape out)."""
        clipped = ClipNorm(self.clip)(updates, generator)
        S = expected_sites or next(iter(updates.values())).shape[0]
        return {n: (t.sum(0) + self.noise_multiplier * self.clip * draw_like(t[0], generator, "normal")) / S
                for n, t in clipped.items()}

    def epsilon(self, rounds: int, sites_per_round: int, population: int) -> float:
        """Epsilon over `rounds` rounds, sites sampled at rate sites_per_round / population (Poisson)."""
        return epsilon_spent(self.noise_multiplier, sites_per_round / population, rounds, self.delta, self.accountant)
