"""`medpfl train --audit-dp canaries=N`: canaries in one training run, and epsilon measured beside epsilon promised.

Under client-level DP the canaries are clients (defenses.canaries.ClientCanaries); under DP-SGD, and without
any DP, they are Dirac gradients among each local step's per-example ones (GradientCanaries). After the last
round the one-run bound (defenses.dp_audit) is written to dp_audit.json; the run's summary sets it beside
the accountant's epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medpfl.defenses import DPSGD, Chain, ClientLevelDP
from medpfl.defenses.accounting import DEFAULT_DELTA
from medpfl.defenses.canaries import ClientCanaries, GradientCanaries
from medpfl.defenses.dp_audit import audit
from medpfl.defenses.dpsgd import local_sample_rate
from medpfl.defenses.training import DPSGDFederation
from medpfl.errors import MedPFLError
from medpfl.fl.local import LocalTraining
from medpfl.fl.rounds import RoundHooks

AUDIT_FILE = "dp_audit.json"
_UNCLIPPED = 1e30  # a clipping norm no gradient reaches (infinity would make DP-SGD's zero noise 0 x inf = nan)


def parse_audit(text: str | None) -> int:
    """'canaries=N' -> N (None or '' -> 0: no audit); anything else raises naming --audit-dp."""
    if not text:
        return 0
    key, _, value = text.partition("=")
    if key.strip() != "canaries" or not value.strip().isdigit() or int(value) < 2:
        raise MedPFLError(f"--audit-dp '{text}' is not understood; write canaries=N with N of 2 or more, "
                          "e.g. --audit-dp canaries=1000.")
    return int(value)


def auditable(chain: Chain) -> bool:
    """Whether --audit-dp has a guarantee to check in `chain`: client-level DP, DP-SGD, or none at all (what one
    record shows of itself without DP)."""
    return isinstance(chain.server, ClientLevelDP) or chain.local is not None or not chain.defenses


class PrivacyAudit:
    """The canaries of one run: where they join training, and the bound their scores give after it."""

    def __init__(self, m: int, chain: Chain, sites: list[tuple[torch.Tensor, torch.Tensor]],
                 weights: dict[str, torch.Tensor], training: LocalTraining, seed: int):
        self.chain, self.sites, self.observers = chain, sites, ()
        self.clients = self.gradients = None
        guarantee = chain.server if isinstance(chain.server, ClientLevelDP) else chain.local
        self.delta = guarantee.delta if guarantee is not None else DEFAULT_DELTA
        self.initial = {n: w.detach().clone() for n, w in weights.items()}
        if isinstance(chain.server, ClientLevelDP):
            self.level, self.kind = "client", "random-direction clients"
            self.clients = ClientCanaries.draw(m, weights, chain.server.clip, seed)
            self.server = server = self.clients.server(chain.server)
            self.chain = replace(chain, defenses=tuple(server if d is chain.server else d for d in chain.defenses))
        elif auditable(chain):
            # Without DP the canaries join plain SGD computed as DP-SGD computes it (per example, on Poisson-
            # sampled batches) with no clipping and no noise, each of norm 1, where DP-SGD clips by default.
            self.level, self.kind = "example", "Dirac gradients"
            rates = [local_sample_rate(len(y), training) for _, y in sites]
            self.gradients = GradientCanaries.draw(m, rates, weights, seed)
            if chain.local is not None:
                local = self.gradients.dpsgd(chain.local)
                self.chain = replace(chain, defenses=tuple(local if d is chain.local else d for d in chain.defenses))
            self.plain_sgd = self.gradients.dpsgd(DPSGD(noise_multiplier=0.0, clip=_UNCLIPPED), norm=1.0)
            self.observers = (self.gradients,)
        else:
            raise MedPFLError(f"--audit-dp checks a DP guarantee: dpsgd, cdp, or none to measure an undefended "
                              f"run; '{chain.label()}' gives no epsilon to check.")

    def federation(self, model: nn.Module, num_classes: int, training: LocalTraining, seed: int,
                   hooks: RoundHooks, model_check=None) -> DPSGDFederation | None:
        """The engine of an audit without DP: DP-SGD's steps unclipped and noiseless, gradient canaries in them."""
        if self.chain.defenses or self.gradients is None:
            return None
        return DPSGDFederation(model, self.sites, num_classes, training, seed, hooks, vectorise=False,
                               dp=self.plain_sgd, model_check=model_check)

    def flower_aggregate(self):
        """The aggregator of the Flower engine's rounds: client-level DP's mean with the canary clients in it."""
        return self.server.flower_mean

    def state(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs besides the weights: the gradient canaries' scores summed so far (canary
        clients are scored from the initial and final weights alone)."""
        return {"audit_scores": torch.from_numpy(self.gradients.scores.copy())} if self.gradients is not None else {}

    def resume(self, saved: dict[str, Any] | None, file: Path) -> None:
        """Take up the scores of the rounds a resumed run finished earlier (`saved`: its state, None when fresh)."""
        if saved is None or self.gradients is None:
            return
        if "audit_scores" not in saved:
            raise MedPFLError(f"'{file}' holds no canary scores of the privacy audit to resume; rerun with --fresh.")
        self.gradients.scores = saved["audit_scores"].double().numpy().copy()

    def result(self, final: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The bound, what it rests on, and the canary scores (for a plot of in against out)."""
        if self.clients is not None:
            scores, included = self.clients.scores(self.initial, final), self.clients.included
        else:
            scores, included = self.gradients.scores, self.gradients.included
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
