"""Combining several noised FedSGD rounds of one site (`--attack multi-round`) against one round's robust attacks.

Part "known": the same real images behind R rounds, each round's update the gradient at other weights (a fresh
iDLG LeNet per round and image) with its own draw of the defense's noise, as tests/test_adaptive_attacks.py
builds them. Per image: SSIM of robust-l2 and robust-cosine on each single round, and of multi-round on the first
R rounds for each R.

Part "last-round": a cell of `medpfl sweep --attacks strongest --defenses SPEC --image-size 16 --rounds N` (its
federation: 5 FedSGD sites of one image, iDLG's LeNet, seed 0) whose curious server attacks only the last round,
where strongest combines every round it kept of each site (multi-round): the sweep's numbers at that round, at
a fraction of the time (the sweep also attacks round 1, where there is nothing to combine). With --restarts R:
every attack's restarts. Plain iDLG is strongest's own idlg candidate (the same stream as --attacks idlg).

    OMP_NUM_THREADS=1 python benchmarks/multi_round_noise.py known
    OMP_NUM_THREADS=1 python benchmarks/multi_round_noise.py last-round --rounds 10 --defenses gaussian:sigma=0.01 \
        --restarts 1

JSON goes to benchmarks/results/multi_round_noise_known.json and multi_round_noise_last_round_roundsN_DEFENSE.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from medpfl.attacks import build_attack
from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.experiments.run_dir import library_versions
from medpfl.experiments.sweep import SweepConfig
from medpfl.metrics.image import ssim
from medpfl.metrics.privacy import SUCCESS_SSIM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_adaptive_attacks import defended  # noqa: E402  (the tests' defended update, one round at a time)

from strongest_attacker import rate  # noqa: E402  (ASR with its Wilson interval, mean SSIM; this folder's)


def known(args) -> dict:
    source = embedded_source()
    x, y = ImageDataset(source, sample_items(source.items, args.n_images, seed=0), size=16).load_batch(
        range(args.n_images))
    images, labels, K = x[:, None], y[:, None], len(source.classes)
    budget = {"steps": args.steps, "restarts": args.restarts or 0}
    cells = []
    for spec in args.defenses.split(";"):
        rounds = [defended(spec, images, labels, K, r) for r in range(max(args.combine))]
        single = {}
        for attack in ("robust-l2", "robust-cosine"):
            per_round = []
            for payload, update in rounds:
                result = build_attack(attack, **budget).reconstruct(payload, update, torch.Generator().manual_seed(0))
                per_round.append(ssim(result.images[:, 0], x).tolist())
            single[attack] = per_round  # rounds x images
        combined = {}
        for R in args.combine:
            started = time.perf_counter()
            result = build_attack("multi-round", **budget).reconstruct_rounds(
                [p for p, _ in rounds[:R]], [u for _, u in rounds[:R]], torch.Generator().manual_seed(0))
            combined[R] = {"ssim": ssim(result.images[:, 0], x).tolist(), "seconds": time.perf_counter() - started}
        cell = {"defense": spec, "single_round_ssim": single, "multi_round": combined,
                "single_round_max": max(max(r) for q in single.values() for r in q)}
        print(spec, "single max", round(cell["single_round_max"], 3),
              {R: [round(v, 3) for v in c["ssim"]] for R, c in combined.items()}, flush=True)
        cells.append(cell)
    return {"cells": cells}


def last_round(args) -> dict:
    """The sweep's federation cell (`SweepConfig.federation`) whose curious server attacks only the last round,
    where strongest combines every round it kept: the sweep's last-round half, without its round-1 attack."""
    from dataclasses import replace

    from medpfl.experiments.train_run import ATTACKS_FILE, run_training

    cells = []
    for n_rounds in [int(r) for r in args.rounds.split(",")]:
        for spec in args.defenses.split(";"):
            sweep_config = SweepConfig(defenses=[spec], image_size=16, rounds=n_rounds)
            config = replace(sweep_config.federation(spec, 0, "strongest"), attack_rounds=[n_rounds],
                             attack_settings={} if args.restarts is None else {"restarts": args.restarts})
            out = Path(args.out) / f"{spec.replace(':', '-')}-rounds{n_rounds}"
            started = time.perf_counter()
            run_training(config, out)
            attacks = [json.loads(line) for line in (out / ATTACKS_FILE).read_text().splitlines()]
            names = attacks[0]["ssim_by_attack"]
            cells.append({"rounds": n_rounds, "defense": spec, "n_images": sum(len(a["ssim"]) for a in attacks),
                          "strongest": rate([s for a in attacks for s in a["ssim"]]),
                          **{name: rate([s for a in attacks for s in a["ssim_by_attack"][name]]) for name in names},
                          "winners": [w for a in attacks for w in a["winner"]],
                          "rounds_combined": attacks[0].get("rounds_combined"),
                          "wall_seconds": time.perf_counter() - started})
            print(cells[-1], flush=True)
    return {"cells": cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("known", "last-round"))
    parser.add_argument("--defenses", help="defense specs separated by ';'")
    parser.add_argument("--n-images", type=int, default=4)
    parser.add_argument("--combine", default="1,2,4,8,10", help="known: rounds combined")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--restarts", type=int, help="known: 0 unless given; last-round: the attacks' own unless given")
    parser.add_argument("--rounds", default="3", help="last-round: the federation's rounds, e.g. 3,10")
    parser.add_argument("--out", default="runs/multi-round-noise")
    args = parser.parse_args()
    args.combine = [int(r) for r in args.combine.split(",")]
    if args.defenses is None:
        args.defenses = ("gaussian:sigma=0.01;gaussian:sigma=0.03" if args.part == "known"
                         else "laplace:b=0.01;gaussian:sigma=0.01")
    result = known(args) if args.part == "known" else last_round(args)
    name = args.part if args.part == "known" else (f"last_round_rounds{args.rounds.replace(',', '-')}_"
                                                   + args.defenses.replace(":", "-").replace(";", "_"))
    path = Path(f"benchmarks/results/multi_round_noise_{name}.json")
    path.write_text(json.dumps({"settings": vars(args), "model": "lenet-idlg", "image_size": 16,
                                "success_ssim": SUCCESS_SSIM, "machine": platform.machine(),
                                "versions": library_versions(), **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
