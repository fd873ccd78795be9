"""`medpfl train --audit-dp canaries=N`: canaries in one training run, and epsilon measured beside epsilon promised.

Under client-level DP the canaries are clients (defenses.canaries.ClientCanaries); under DP-SGD they are
gradients among each step's per-example ones (GradientCanaries); with neither they are images in the sites'
data (ExampleCanaries), which without clipping have no bounded effect a gradient canary could stand for. After the last round the one-run bound
(defenses.dp_audit) is written to dp_audit.json; the run's summary sets it beside the accountant's epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from medpfl.defenses import DPSGD, Chain, ClientLevelDP
from medpfl.defenses.accounting import DEFAULT_DELTA
from medpfl.defenses.canaries import ClientCanaries, ExampleCanaries, GradientCanaries
from medpfl.defenses.dp_audit import audit
from medpfl.errors import MedPFLError

AUDIT_FILE = "dp_audit.json"


def parse_audit(text: str | None) -> int:
    """'canaries=N' -> N (None or '' -> 0: no audit); anything else raises naming --audit-dp."""
    if not text:
        return 0
    key, _, value = text.partition("=")
    if key.strip() != "canaries" or not value.strip().isdigit() or int(value) < 2:
        raise MedPFLError(f"--audit-dp '{text}' is not understood; write canaries=N with N of 2 or more, "
                          "e.g. --audit-dp canaries=1000.")
    return int(value)


class PrivacyAudit:
    """The canaries of one run: where they join training, and the bound their scores give after it."""

    def __init__(self, m: int, chain: Chain, model: nn.Module, sites: list[tuple[torch.Tensor, torch.Tensor]],
                 num_classes: int, channels: int, image_size: int, weights: dict[str, torch.Tensor], seed: int):
        self.chain, self.sites, self.observers = chain, sites, ()
        self.clients = self.examples = self.gradients = None
        guarantee = chain.server if isinstance(chain.server, ClientLevelDP) else chain.local
        self.delta = guarantee.delta if guarantee is not None else DEFAULT_DELTA
        self.initial = {n: w.detach().clone() for n, w in weights.items()}
        if isinstance(chain.server, ClientLevelDP):
            self.level, self.kind = "client", "random-direction clients"
            self.clients = ClientCanaries.draw(m, weights, chain.server.clip, seed)
            server = self.clients.server(chain.server)
            self.chain = replace(chain, defenses=tuple(server if d is chain.server else d for d in chain.defenses))
        elif chain.local is not None:
            self.level, self.kind = "example", "Dirac gradients"
            self.gradients = GradientCanaries.draw(m, len(sites), weights, seed)
            local = self.gradients.dpsgd(chain.local)
            self.chain = replace(chain, defenses=tuple(local if d is chain.local else d for d in chain.defenses))
            self.observers = (self.gradients,)
        else:
            self.level, self.kind = "example", "noise images with random labels"
            device = sites[0][1].device
            self.examples = ExampleCanaries.draw(m, len(sites), channels, image_size, num_classes, seed, device)
            self.sites = self.examples.add_to(sites)
            self.observers = (self.examples.scorer(model, num_classes),)

    def result(self, final: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The bound, what it rests on, and the canary scores (for a plot of in against out)."""
        if self.clients is not None:
            scores, included = self.clients.scores(self.initial, final), self.clients.included
        else:
            canaries = self.gradients or self.examples
            scores, included = canaries.scores, canaries.included
        result = audit(scores, included, self.delta)
        return {"level": self.level, "canary": self.kind, **result.to_json(), "scores_in": np.asarray(scores)[included].tolist(),
                "scores_out": np.asarray(scores)[~included].tolist()}


def compare(audit: dict[str, Any], epsilon_upper: float | None) -> dict[str, Any]:
    """The audit beside the accountant's epsilon; a measured lower bound above it means a broken guarantee."""
    broken = epsilon_upper is not None and audit["epsilon_lower"] > epsilon_upper
    return {**{k: v for k, v in audit.items() if not k.startswith("scores_")}, "epsilon_upper": epsilon_upper,
            "guarantee_broken": broken}


# Controls for the audit itself: mechanisms with their noise off whose accountants still count it. An audit
# that does not flag them has too little power to catch a real bug (benchmarks/dp_audit.py, the tests).

@dataclass
class NoiselessDPSGD(DPSGD):
    """DP-SGD with its noise switched off while the accountant still counts the calibrated multiplier."""

    def _noise(self) -> float:
        return 0.0


@dataclass
class NoiselessClientDP(ClientLevelDP):
    """Client-level DP whose server forgets its noise while the accountant still counts it."""

    def aggregate(self, updates, generator, expected_sites=None):
        return ClientLevelDP(0.0, self.clip).aggregate(updates, generator, expected_sites)
