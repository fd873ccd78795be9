"""Utility under a defense: a federation trained with the defense in every round, at every site.

Runs on the in-process engine through the seams defenses.training.DefendedFederation fills (as
`medpfl train --defense` does). Secure aggregation leaves the aggregate unchanged, so a federation
trains as without it. Training settings are `medpfl train`'s defaults.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from medpfl.data import ImageDataset, open_verified
from medpfl.defenses import Chain
from medpfl.defenses.training import DefendedFederation
from medpfl.experiments.run_dir import append_result, open_run_dir, read_results, write_json
from medpfl.experiments.train_run import TrainRunConfig
from medpfl.fl.gradients import functional_model
from medpfl.fl.partition import federate
from medpfl.fl.utility import chance_levels, evaluate
from medpfl.models.registry import build_model
from medpfl.seeds import model_seed

DEFAULTS = TrainRunConfig()  # FedAvg, 2 local epochs of batch 16, lr 0.05, momentum 0.9, GroupNorm ConvNet
TRAINING = DEFAULTS.training


def train_with_defense(chain: Chain, sweep, seed: int, path: Path) -> dict[str, Any]:
    """Train `sweep.rounds` rounds of `sweep.sites` IID sites with `chain` inside; the final model's utility."""
    device = torch.device(sweep.device)
    source, _ = open_verified(sweep.data)  # broken files left out, as the sweep's attack cells do
    federation = federate(source, sweep.sites, "iid", seed)
    K = len(federation.classes)

    def load(items) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = ImageDataset(source, list(items), size=sweep.image_size, channels=sweep.channels).load_batch(
            range(len(items)))
        return x.to(device), y.to(device)

    sites, test = [load(items) for items in federation.sites], load(federation.test)
    net = build_model(DEFAULTS.model, K, sweep.channels, sweep.image_size, norm=DEFAULTS.norm, seed=model_seed(seed)).to(device)
    model = functional_model(net)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    defended = DefendedFederation(chain, model, sites, K, TRAINING, sweep.rounds, seed, vectorise=True)
    dp = defended.dp
    record = {"defense": chain.label(), "seed": seed, "rounds": sweep.rounds, "sites": sweep.sites,
              "training": TRAINING.__dict__, "model": DEFAULTS.model, "image_size": sweep.image_size}
    run = open_run_dir(path, record, resume=False)
    torch.save({n: w.cpu() for n, w in weights.items()}, run / "initial.pt")
    started = time.perf_counter()
    for round_index in range(1, sweep.rounds + 1):
        weights = defended.run_round(weights, round_index).weights
        append_result(run, {"round": round_index, **evaluate(model, weights, *test)})
    torch.save({n: w.cpu() for n, w in weights.items()}, run / "final.pt")
    final = list(read_results(run))[-1]
    chance = chance_levels(test[1].cpu().numpy(), K)
    result = {**{k: final[k] for k in ("accuracy", "balanced_accuracy", "auc")},
              "accuracy_chance": chance["accuracy"], "balanced_accuracy_chance": chance["balanced_accuracy"],
              "train_seconds": time.perf_counter() - started,
              "epsilon": defended.epsilon() if dp else chain.epsilon(),
              "noise_multiplier": dp.noise_multiplier if dp else None,
              **{k: v for k, v in defended.privacy_record().items() if k not in ("epsilon", "noise_multiplier")}}
    write_json(run / "summary.json", result)
    return result
