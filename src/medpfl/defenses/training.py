"""A defense chain inside every round of an in-process federation, as `medpfl train --defense` and the sweep run it.

The site-side transforms (clip, noise, top-k, quantization, client-level DP's clipping) are the round's
site_transform; client-level DP's noisy mean is its aggregator; DP-SGD replaces each local step's
gradient by a clipped, noised one on a Poisson-sampled batch, and one ledger per site counts every local
step of every round at that site's own sample rate: sites of different sizes spend different epsilons,
the noise is calibrated for the worst-off one, and the run reports each site's and their maximum.
"""

from __future__ import annotations

import torch
from torch import nn

from medpfl.defenses.accounting import PrivacyLedger
from medpfl.defenses.chain import Chain
from medpfl.defenses.dpsgd import dp_local_update, dp_schedules
from medpfl.fl.aggregate import weighted_average
from medpfl.fl.local import LocalTraining
from medpfl.fl.model_check import ModelCheck
from medpfl.fl.rounds import RoundHooks, RoundObserver, SiteRound, Tamper, Update, ordered
from medpfl.fl.simulation import InProcessFederation, RoundOutcome
from medpfl.seeds import SITE_NOISE, torch_seed


def noise_stream(seed: int, round_index: int, site: int, purpose: int, device: torch.device) -> torch.Generator:
    """A defense's random stream for one site (or the server: site = number of sites) in one round."""
    return torch.Generator(device).manual_seed(torch_seed(seed, SITE_NOISE, round_index, site, purpose))


class DPSGDFederation(InProcessFederation):
    """The in-process engine with each site's local steps run by DP-SGD (never vectorised over sites)."""

    def __init__(self, *args, dp, **kwargs):
        super().__init__(*args, **kwargs)
        self.dp = dp

    def _site_update(self, model: nn.Module, weights: Update, round_index: int, site: int) -> Update:
        x, y = ordered(*self.sites[site], self.seed, round_index, site)
        noise = noise_stream(self.seed, round_index, site, 1, x.device)
        return dp_local_update(model, weights, x, y, self.num_classes, self.training, self.dp.at_site(site, round_index),
                               noise)


class DefendedFederation:
    """An in-process federation with `chain` at every site (and server) in every round, and its privacy ledger."""

    def __init__(self, chain: Chain, model: nn.Module, sites: list[tuple[torch.Tensor, torch.Tensor]],
                 num_classes: int, training: LocalTraining, rounds: int, seed: int,
                 observers: tuple[RoundObserver, ...] = (), vectorise: bool = False,
                 model_check: ModelCheck | None = None, tamper: Tamper | None = None) -> None:
        self.chain, self.seed, self.n_sites = chain, seed, len(sites)
        self.schedules = dp_schedules([len(y) for _, y in sites], training, rounds)
        self.dp = chain.local.for_sites(self.schedules) if chain.local is not None else None
        self.ledgers = [PrivacyLedger() for _ in sites]
        self.rounds_done = 0
        self.steps_per_round = [(rate, steps // rounds) for rate, steps in self.schedules]
        self._round = 0  # the round in progress (its server noise stream)
        hooks = RoundHooks(self._site_transform, self._aggregate if chain.server else weighted_average,
                           tuple(observers))
        self.engine = (DPSGDFederation(model, sites, num_classes, training, seed, hooks, vectorise=False, dp=self.dp,
                                       model_check=model_check, tamper=tamper)
                       if self.dp is not None else
                       InProcessFederation(model, sites, num_classes, training, seed, hooks, vectorise, model_check,
                                           tamper=tamper))

    def _site_transform(self, update: Update, facts: SiteRound) -> Update:
        generator = noise_stream(self.seed, facts.round, facts.site, 0, next(iter(update.values())).device)
        return {n: t[0] for n, t in self.chain.on_site({n: u[None] for n, u in update.items()}, generator).items()}

    def _aggregate(self, stacked: Update, n_images) -> Update:
        # Client-level DP: the server's noisy mean of the clipped updates, its noise the round's own stream.
        device = next(iter(stacked.values())).device
        return self.chain.server.aggregate(stacked, noise_stream(self.seed, self._round, self.n_sites, 0, device))

    def resume(self, rounds_done: int) -> None:
        """Count the noisy steps of `rounds_done` rounds finished earlier (a resumed run)."""
        for _ in range(rounds_done - self.rounds_done):
            self._account()

    def run_round(self, weights: Update, round_index: int) -> RoundOutcome:
        """Round `round_index` with the defense inside, its noisy steps counted."""
        self._round = round_index
        outcome = self.engine.run_round(weights, round_index)
        self._account()
        return outcome

    def _account(self) -> None:
        self.rounds_done += 1
        if self.dp is not None:
            for ledger, (rate, steps) in zip(self.ledgers, self.steps_per_round):
                ledger.record(self.dp.noise_multiplier, rate, steps)

    def epsilon_per_site(self) -> list[float] | None:
        """DP-SGD's epsilon per example at each site over the rounds run so far (each site's own sample rate
        and steps); None without DP-SGD."""
        if self.dp is None:
            return None
        spent: dict[tuple, float] = {}  # sites of equal size share a history: account it once
        for ledger in self.ledgers:
            key = tuple(ledger.history)
            if key not in spent:
                spent[key] = ledger.epsilon(self.dp.delta, self.dp.accountant)
        return [spent[tuple(ledger.history)] for ledger in self.ledgers]

    def privacy_record(self) -> dict:
        """What a round's record says of privacy so far: epsilon (the worst-off site's), and under DP-SGD each
        site's epsilon, sample rate and noisy steps and the noise multiplier; empty for heuristic defenses."""
        epsilon = self.epsilon()
        if epsilon is None:
            return {}
        if self.dp is None:
            return {"epsilon": epsilon}
        return {"epsilon": epsilon, "epsilon_per_site": self.epsilon_per_site(),
                "noise_multiplier": self.dp.noise_multiplier, "dp_delta": self.dp.delta,
                "dp_sample_rate_per_site": [rate for rate, _ in self.steps_per_round],
                "dp_steps_per_site": [ledger.steps for ledger in self.ledgers]}

    def epsilon(self) -> float | None:
        """Epsilon over the rounds run so far, None if heuristic: DP-SGD's per example at the worst-off site
        (the largest of epsilon_per_site), or client-level DP's per site."""
        if self.dp is not None:
            return max(self.epsilon_per_site())
        if self.chain.server is not None:
            return self.chain.server.epsilon(self.rounds_done, 1, 1)
        return None
