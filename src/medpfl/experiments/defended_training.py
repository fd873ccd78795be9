"""Utility under a defense: a federation trained with the defense in every round, at every site.

Runs on the in-process engine (fl.simulation) through its seams: the site-side transforms (clip,
noise, top-k, quantization, client-level DP's clipping) are the round's site_transform; client-level
DP's noisy mean is its aggregator; DP-SGD replaces each local step's gradient by a clipped, noised one,
and its ledger counts every local step of every round. Secure aggregation leaves the aggregate
unchanged, so a federation trains as without it. Training settings are `medpfl train`'s defaults.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from medpfl.data import ImageDataset, open_source
from medpfl.defenses import Chain, PrivacyLedger
from medpfl.defenses.dpsgd import DPSGD, dp_local_update
from medpfl.experiments.run_dir import append_result, open_run_dir, read_results, write_json
from medpfl.experiments.train_run import TrainRunConfig
from medpfl.fl.gradients import functional_model
from medpfl.fl.local import LocalTraining
from medpfl.fl.partition import federate
from medpfl.fl.rounds import RoundHooks, SiteRound, Update, ordered
from medpfl.seeds import SITE_NOISE, model_seed, torch_seed
from medpfl.fl.simulation import InProcessFederation
from medpfl.fl.utility import chance_levels, evaluate
from medpfl.models.registry import build_model

DEFAULTS = TrainRunConfig()  # FedAvg, 2 local epochs of batch 16, lr 0.05, momentum 0.9, GroupNorm ConvNet
TRAINING = DEFAULTS.training


def dp_schedule(n_images: list[int], training: LocalTraining, rounds: int) -> tuple[float, int]:
    """DP-SGD's (sample rate, steps) for the site with the most steps: batch / images, steps over all rounds."""
    site = max(range(len(n_images)), key=lambda s: training.steps(n_images[s]))
    batch = training.batch_size if training.protocol == "fedavg" else n_images[site]
    return min(1.0, batch / n_images[site]), rounds * training.steps(n_images[site])


def _stream(seed: int, round_index: int, site: int, purpose: int, device: torch.device) -> torch.Generator:
    """A defense's random stream for one site (or the server: site = number of sites) in one round."""
    return torch.Generator(device).manual_seed(torch_seed(seed, SITE_NOISE, round_index, site, purpose))


class DPSGDFederation(InProcessFederation):
    """The in-process engine with each site's local steps run by DP-SGD (sites one at a time)."""

    def __init__(self, *args, dp: DPSGD, **kwargs):
        super().__init__(*args, **kwargs)
        self.dp = dp

    def _raw_updates(self, weights: Update, round_index: int) -> list[Update]:
        updates = []
        for s, (x, y) in enumerate(self.sites):
            xo, yo = ordered(x, y, self.seed, round_index, s)
            noise = _stream(self.seed, round_index, s, 1, xo.device)
            updates.append(dp_local_update(self.model, weights, xo, yo, self.num_classes, self.training, self.dp,
                                           noise))
        return updates


def train_with_defense(chain: Chain, sweep, seed: int, path: Path) -> dict[str, Any]:
    """Train `sweep.rounds` rounds of `sweep.sites` IID sites with `chain` inside; the final model's utility."""
    device = torch.device(sweep.device)
    source = open_source(sweep.data)
    federation = federate(source, sweep.sites, "iid", seed)
    K = len(federation.classes)

    def load(items) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = ImageDataset(source, list(items), size=sweep.image_size).load_batch(range(len(items)))
        return x.to(device), y.to(device)

    sites, test = [load(items) for items in federation.sites], load(federation.test)
    net = build_model(DEFAULTS.model, K, 3, sweep.image_size, norm=DEFAULTS.norm, seed=model_seed(seed)).to(device)
    model = functional_model(net)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    n_images = federation.n_images
    rate, steps = dp_schedule(n_images, TRAINING, sweep.rounds)
    dp = chain.local.calibrated(rate, steps) if chain.local is not None else None

    def site_transform(update: Update, facts: SiteRound) -> Update:
        generator = _stream(seed, facts.round, facts.site, 0, device)
        return {n: t[0] for n, t in chain.on_site({n: u[None] for n, u in update.items()}, generator).items()}

    hooks = RoundHooks(site_transform=site_transform)
    engine = (DPSGDFederation(model, sites, K, TRAINING, seed, hooks, dp=dp) if dp is not None
              else InProcessFederation(model, sites, K, TRAINING, seed, hooks))
    ledger = PrivacyLedger()
    record = {"defense": chain.label(), "seed": seed, "rounds": sweep.rounds, "sites": sweep.sites,
              "training": TRAINING.__dict__, "model": DEFAULTS.model, "image_size": sweep.image_size}
    run = open_run_dir(path, record, resume=False)
    torch.save({n: w.cpu() for n, w in weights.items()}, run / "initial.pt")
    started = time.perf_counter()
    for round_index in range(1, sweep.rounds + 1):
        if chain.server is not None:  # client-level DP: the server's noisy mean of the clipped updates
            noise = _stream(seed, round_index, len(sites), 0, device)
            hooks.aggregate = lambda stacked, counts, noise=noise: chain.server.aggregate(stacked, noise)
        weights = engine.run_round(weights, round_index).weights
        if dp is not None:  # every site runs the same schedule; the ledger is the busiest site's
            ledger.record(dp.noise_multiplier, rate, steps // sweep.rounds)
        append_result(run, {"round": round_index, **evaluate(model, weights, *test)})
    torch.save({n: w.cpu() for n, w in weights.items()}, run / "final.pt")
    final = list(read_results(run))[-1]
    chance = chance_levels(test[1].cpu().numpy(), K)
    result = {**{k: final[k] for k in ("accuracy", "balanced_accuracy", "auc")},
              "accuracy_chance": chance["accuracy"], "balanced_accuracy_chance": chance["balanced_accuracy"],
              "train_seconds": time.perf_counter() - started,
              "epsilon": ledger.epsilon(dp.delta, dp.accountant) if dp else chain.epsilon(),
              "noise_multiplier": dp.noise_multiplier if dp else None,
              "dp_sample_rate": rate if dp else None, "dp_steps": ledger.steps if dp else None}
    write_json(run / "summary.json", result)
    return result
