"""Client-level DP: each site clips its whole update, the server adds Gaussian noise to the aggregate.

As Flower's DifferentialPrivacyClientSideFixedClipping does; epsilon protects a whole site's
participation, accounted over rounds with sites sampled at rate sites_per_round / population (all
sites every round: no amplification by sampling). The curious server still sees each clipped update
before it adds the noise, so against it only the clipping acts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medpfl.defenses.accounting import DEFAULT_DELTA, epsilon_spent
from medpfl.defenses.base import Defense, Update, draw_like
from medpfl.defenses.clip import ClipNorm


@dataclass
class ClientLevelDP(Defense):
    """Sites clip to `clip`; the server's mean gets noise of std `noise_multiplier * clip` / sites."""

    noise_multiplier: float = 1.0
    clip: float = 1.0
    delta: float = DEFAULT_DELTA
    accountant: str = "rdp"
    rounds: int = 20  # the run's rounds, for the accountant (a federation passes its own)
    name = "cdp"
    stage = "server"

    def __call__(self, update: Update, generator: torch.Generator) -> Update:
        """The site's side: clip its whole update."""
        return ClipNorm(self.clip)(update, generator)

    def aggregate(self, updates: Update, generator: torch.Generator, expected_sites: int | None = None) -> Update:
        """The server's side: noisy mean of the clipped site updates (name -> S x shape in, shape out)."""
        clipped = ClipNorm(self.clip)(updates, generator)
        S = expected_sites or next(iter(updates.values())).shape[0]
        return {n: (t.sum(0) + self.noise_multiplier * self.clip * draw_like(t[0], generator, "normal")) / S
                for n, t in clipped.items()}

    def epsilon(self, rounds: int, sites_per_round: int, population: int) -> float:
        """Epsilon over `rounds` rounds, sites sampled at rate sites_per_round / population (Poisson)."""
        return epsilon_spent(self.noise_multiplier, sites_per_round / population, rounds, self.delta, self.accountant)

    def epsilon_spent(self) -> float:
        """Epsilon over `rounds` rounds in which every site takes part."""
        return self.epsilon(self.rounds, 1, 1)
