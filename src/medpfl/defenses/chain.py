"""Defenses composed in the order a site applies them: local training, clip, noise, sparsify, quantize, channel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from medpfl.defenses.base import STAGES, Defense, Update
from medpfl.errors import MedPFLError


@dataclass
class Chain:
    """Several defenses applied in stage order (whatever order they are given in)."""

    defenses: tuple[Defense, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.defenses = tuple(sorted(self.defenses, key=lambda d: STAGES.index(d.stage)))
        for stage in ("local", "channel", "server"):
            if sum(d.stage == stage for d in self.defenses) > 1:
                raise MedPFLError(f"A defense chain takes at most one {stage} defense "
                                  f"({', '.join(d.name for d in self.defenses if d.stage == stage)} given).")

    @property
    def local(self) -> Defense | None:
        """The local-training defense (DP-SGD), if any."""
        return next((d for d in self.defenses if d.stage == "local"), None)

    @property
    def channel(self) -> Defense | None:
        """The channel (secure aggregation), if any."""
        return next((d for d in self.defenses if d.stage == "channel"), None)

    @property
    def server(self) -> Defense | None:
        """The server-side aggregation defense (client-level DP), if any."""
        return next((d for d in self.defenses if d.stage == "server"), None)

    @property
    def sites_per_update(self) -> int:
        """How many sites' updates the server sees only summed (1 without secure aggregation)."""
        return getattr(self.channel, "k", 1)

    def calibrated(self) -> Chain:
        """This chain with DP-SGD's noise multiplier set for its target epsilon over its schedule."""
        return Chain(tuple(d.calibrated() if hasattr(d, "calibrated") else d for d in self.defenses))

    def epsilon(self) -> float | None:
        """The (epsilon, delta) guarantee's epsilon (DP-SGD per example, or client-level DP per site; both:
        DP-SGD's); None for heuristic defenses."""
        local = self.local
        if local is not None and local.noise_multiplier is not None:
            return local.epsilon_spent()
        return self.server.epsilon_spent() if self.server is not None else None

    def on_site(self, update: Update, generator: torch.Generator) -> Update:
        """What each site does to its computed update before sending it (sites stacked on dim 0)."""
        for d in self.defenses:
            if d.stage not in ("local", "channel"):
                update = d(update, generator)  # client-level DP: the site's clipping
        return update

    def observe(self, update: Update, generator: torch.Generator) -> Update:
        """What the server receives from the sites' computed updates: site transforms, then the channel."""
        update = self.on_site(update, generator)
        return self.channel(update, generator) if self.channel else update

    def label(self) -> str:
        """'none', or the defenses' labels joined by '+'."""
        return "+".join(d.label() for d in self.defenses) or "none"

    def config(self) -> list[dict[str, Any]]:
        return [d.config() for d in self.defenses]
