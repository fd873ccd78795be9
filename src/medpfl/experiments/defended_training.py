"""Utility under a defense: a federation trained with the defense in every round, at every site.

The site-side transforms (clip, noise, top-k, quantization) act on each site's update before it is
sent (fl.rounds' site_transform seam); DP-SGD replaces each local step's gradient by a clipped,
noised one, and its accountant counts every local step of every round. Client-level DP
clips at the sites and noises the server's mean (the server's stream: SITE_NOISE keyed by the round
and the site count, beside the sites' own). Secure aggregation leaves the aggregate unchanged, so it
trains as without it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from medpfl.data import ImageDataset, open_source
from medpfl.defenses import Chain, PrivacyLedger
from medpfl.defenses.dpsgd import dp_local_update
from medpfl.experiments.run_dir import append_result, open_run_dir, read_results, write_json
from medpfl.fl.aggregate import apply_update, weighted_average
from medpfl.fl.gradients import functional_model
from medpfl.fl.local import LocalTraining
from medpfl.fl.partition import federate
from medpfl.fl.rounds import SiteRound, ordered, site_update
from medpfl.fl.seeds import SITE_NOISE, model_seed, torch_seed
from medpfl.fl.utility import chance_levels, evaluate
from medpfl.models.registry import build_model

# The federation's defaults (see medpfl train): FedAvg, one local epoch of batches of 16, lr 0.05 with
# momentum 0.9, a GroupNorm ConvNet (Opacus-compatible, and what DP-SGD needs).
TRAINING = LocalTraining("fedavg", epochs=1, batch_size=16, lr=0.05, momentum=0.9)
MODEL = "convnet"


def dp_schedule(n_images: list[int], training: LocalTraining, rounds: int) -> tuple[float, int]:
    """DP-SGD's (sample rate, steps) for the site with the most steps: batch / images, steps over all rounds."""
    site = max(range(len(n_images)), key=lambda s: training.steps(n_images[s]))
    batch = training.batch_size if training.protocol == "fedavg" else n_images[site]
    return min(1.0, batch / n_images[site]), rounds * training.steps(n_images[site])


def train_with_defense(chain: Chain, sweep, seed: int, path: Path) -> dict[str, Any]:
    """Train `sweep.rounds` rounds of a federation of `sweep.sites` IID sites with `chain` inside; its utility."""
    device = torch.device(sweep.device)
    source = open_source(sweep.data)
    federation = federate(source, sweep.sites, "iid", seed)
    K = len(federation.classes)
    load = lambda items: ImageDataset(source, list(items), size=sweep.image_size).load_batch(  # noqa: E731
        range(len(items)))
    sites = [tuple(t.to(device) for t in load(items)) for items in federation.sites]
    test = tuple(t.to(device) for t in load(federation.test))
    net = build_model(MODEL, K, 3, sweep.image_size, norm="group", seed=model_seed(seed)).to(device)
    model = functional_model(net)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    n_images = federation.n_images
    rate, steps = dp_schedule(n_images, TRAINING, sweep.rounds)
    dp = chain.local.calibrated(rate, steps) if chain.local is not None else None
    ledger = PrivacyLedger()
    record = {"defense": chain.label(), "seed": seed, "rounds": sweep.rounds, "sites": sweep.sites,
              "training": TRAINING.__dict__, "model": MODEL, "image_size": sweep.image_size}
    run = open_run_dir(path, record, resume=False)
    torch.save({n: w.cpu() for n, w in weights.items()}, run / "initial.pt")
    started = time.perf_counter()
    for round_index in range(1, sweep.rounds + 1):
        sent = []
        for s, (x, y) in enumerate(sites):
            facts = SiteRound(round_index, s, n_images[s], TRAINING, seed)
            generator = facts.generator(device)
            if dp is None:
                update = site_update(model, weights, x, y, K, TRAINING, seed, round_index, s)
            else:
                xo, yo = ordered(x, y, seed, round_index, s)
                update = dp_local_update(model, weights, xo, yo, K, TRAINING, dp, generator)
                if s == 0:  # every site runs the same schedule; the ledger is the busiest site's
                    ledger.record(dp.noise_multiplier, rate, steps // sweep.rounds)
            sent.append(chain.on_site({n: u[None] for n, u in update.items()}, generator))
        stacked = {n: torch.cat([u[n] for u in sent]) for n in weights}
        if chain.server is not None:  # client-level DP: the server's noisy mean of the (clipped) updates
            aggregated = chain.server.aggregate(stacked, torch.Generator(device).manual_seed(
                torch_seed(seed, SITE_NOISE, round_index, len(sites))))
        else:
            aggregated = weighted_average(stacked, n_images)
        weights = apply_update(weights, aggregated, TRAINING.protocol, TRAINING.lr)
        append_result(run, {"round": round_index, **evaluate(model, weights, *test)})
    torch.save({n: w.cpu() for n, w in weights.items()}, run / "final.pt")
    final = list(read_results(run))[-1]
    chance = chance_levels(test[1].cpu().numpy(), K)
    result = {**{k: final[k] for k in ("accuracy", "balanced_accuracy", "auc")},
              "accuracy_chance": chance["accuracy"], "balanced_accuracy_chance": chance.get("balanced_accuracy"),
              "train_seconds": time.perf_counter() - started,
              "epsilon": ledger.epsilon(dp.delta, dp.accountant) if dp else chain.epsilon(),
              "noise_multiplier": dp.noise_multiplier if dp else None,
              "dp_sample_rate": rate if dp else None, "dp_steps": ledger.steps if dp else None}
    write_json(run / "summary.json", result)
    return result
