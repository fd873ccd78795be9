"""Every site's DP-SGD epsilon in a non-IID federation, checked against Opacus's RDP accountant.

Runs `medpfl train --partition dirichlet:0.3 --sites 5 --defense dpsgd:epsilon=TARGET` (GroupNorm ConvNet,
FedAvg, `medpfl train`'s defaults otherwise) and compares each site's recorded epsilon with Opacus's
RDPAccountant fed that site's own schedule, counted here from its image count alone: Poisson rate
local batch / images, ceil(images / local batch) x local epochs noisy steps a round. Also what the old
calibration (for the site with the most steps) would have reported and what its sites spent.

    python benchmarks/dp_epsilon_per_site.py --out runs/dp-epsilon-per-site
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opacus.accountants import RDPAccountant

from medpfl.defenses import noise_for_epsilon
from medpfl.experiments.train_run import TrainRunConfig, run_training


def opacus_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(noise, rate, steps)]
    return float(accountant.get_epsilon(delta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dp-epsilon-per-site")
    parser.add_argument("--target", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", default="benchmarks/results/dp_epsilon_per_site.json")
    args = parser.parse_args()
    config = TrainRunConfig(partition="dirichlet:0.3", sites=5, rounds=args.rounds, image_size=args.image_size,
                            defense=f"dpsgd:epsilon={args.target}", seed=args.seed)
    summary = run_training(config, Path(args.out))
    n_images = summary["n_images"]
    batch, epochs, delta = config.local_batch, config.local_epochs, summary["dp_delta"]
    schedules = [(min(1.0, batch / n), args.rounds * epochs * -(-n // batch)) for n in n_images]
    noise = summary["noise_multiplier"]
    opacus = [opacus_epsilon(noise, q, t, delta) for q, t in schedules]
    # The old calibration: for the site with the most steps (the largest), applied to every site.
    busiest = max(range(len(n_images)), key=lambda s: schedules[s][1])
    old_noise = noise_for_epsilon(args.target, *schedules[busiest], delta)
    result = {
        "command": f"medpfl train --partition dirichlet:0.3 --sites 5 --rounds {args.rounds} --image-size "
                   f"{args.image_size} --defense dpsgd:epsilon={args.target} --seed {args.seed}",
        "target_epsilon": args.target, "delta": delta, "n_images": n_images, "noise_multiplier": noise,
        "schedules": [{"sample_rate": q, "steps": t} for q, t in schedules],
        "epsilon_per_site": summary["epsilon_per_site"], "epsilon_per_site_opacus": opacus,
        "max_relative_difference": max(abs(a - b) / b for a, b in zip(summary["epsilon_per_site"], opacus)),
        "epsilon_reported": summary["epsilon"], "within_target": summary["epsilon"] <= args.target,
        "old_calibration": {"noise_multiplier": old_noise, "reported": opacus_epsilon(old_noise, *schedules[busiest],
                                                                                       delta),
                            "spent_per_site": [opacus_epsilon(old_noise, q, t, delta) for q, t in schedules]},
        "final_accuracy": summary["final"]["accuracy"], "chance": summary["chance"]["accuracy"],
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
