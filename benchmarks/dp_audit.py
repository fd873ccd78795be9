"""Epsilon measured (one-run audit, lower, 95%) beside epsilon accounted (upper), per run of `medpfl train`.

The paper's LeNet (`lenet-idlg`, no normalisation) at 16 px on the embedded set, 5 IID sites with all their
images, 10 rounds of `medpfl train`'s FedAvg (2 local epochs of batch 16, lr 0.05, momentum 0.9), 1000
canaries; seeds 0-4. Runs:
  none          no DP: plain SGD computed per example, Dirac gradient canaries (no guarantee to compare with)
  dpsgd-eps-E   DP-SGD calibrated to epsilon E (1, 4, 16): Dirac gradient canaries
  broken-eps-E  the same DP-SGD with its noise switched off, the accountant unchanged: must be flagged
  cdp / broken-cdp  client-level DP (noise multiplier 5) and its noiseless control: canary clients

    python benchmarks/dp_audit.py                     # all runs, JSON to benchmarks/results/dp_audit.json
    python benchmarks/dp_audit.py --runs dpsgd-eps-1 --seeds 0   # replaces that run's rows in the JSON

Each honest run is `medpfl train --model lenet-idlg --norm none --image-size 16 --rounds 10
--defense dpsgd:epsilon=E --audit-dp canaries=1000 --seed S` (or --defense cdp:noise=5, or no --defense).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medpfl.defenses import Chain, parse_defense
from medpfl.experiments.privacy_audit import NoiselessClientDP, NoiselessDPSGD
from medpfl.experiments.train_run import TrainRunConfig, run_training

EPSILONS = (1, 4, 16)
CDP_NOISE = 5.0  # epsilon about 3 over 10 rounds: below the most 1000 canaries can measure (about 4.6)
RUNS: dict[str, tuple[str, Chain]] = {"none": ("none", Chain())}
for eps in EPSILONS:
    RUNS[f"dpsgd-eps-{eps}"] = (f"dpsgd:epsilon={eps}", parse_defense(f"dpsgd:epsilon={eps}"))
    RUNS[f"broken-eps-{eps}"] = (f"dpsgd:epsilon={eps}", Chain((NoiselessDPSGD(epsilon=float(eps)),)))
RUNS["cdp"] = (f"cdp:noise={CDP_NOISE:g}", parse_defense(f"cdp:noise={CDP_NOISE:g}"))
RUNS["broken-cdp"] = (f"cdp:noise={CDP_NOISE:g}", Chain((NoiselessClientDP(noise_multiplier=CDP_NOISE),)))
CONTROLS = ("broken-eps-1", "broken-eps-4", "broken-eps-16", "broken-cdp")  # one seed each: they must be flagged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="runs/dp-audit")
    parser.add_argument("--json", default="benchmarks/results/dp_audit.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name in args.runs.split(","):
        spec, chain = RUNS[name]
        for seed in seeds[:1] if name in CONTROLS else seeds:
            config = TrainRunConfig(model="lenet-idlg", norm="none", image_size=16, rounds=args.rounds, defense=spec,
                                    audit_canaries=args.canaries, seed=seed, device="cpu")
            started = time.perf_counter()
            summary = run_training(config, Path(args.out) / f"{name}-seed{seed}", resume=False, chain=chain)
            audit = summary["dp_audit"]
            rows.append({"run": name, "defense": spec, "seed": seed, "seconds": time.perf_counter() - started,
                         "accuracy": summary["final"]["accuracy"], "accuracy_chance": summary["chance"]["accuracy"],
                         **audit})
            print(f"{name} seed {seed}: upper {audit['epsilon_upper']}, lower {audit['epsilon_lower']:.2f} "
                  f"({audit['correct']}/{audit['guesses']}), broken {audit['guarantee_broken']}", flush=True)
    path = Path(args.json)
    done = [r for r in json.loads(path.read_text())["runs"] if r["run"] not in {r["run"] for r in rows}] \
        if path.exists() else []
    rows = done + rows
    by_run = {}
    for row in rows:
        group = by_run.setdefault(row["run"], {"lower": [], "upper": row["epsilon_upper"], "flagged": 0})
        group["lower"].append(row["epsilon_lower"])
        group["flagged"] += row["guarantee_broken"]
    setup = {"model": "lenet-idlg", "norm": "none", "image_size": 16, "sites": 5, "rounds": args.rounds,
             "canaries": args.canaries, "data": "embedded", "confidence": 0.95}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"setup": setup, "summary": by_run, "runs": rows}, indent=1))
    print(json.dumps(by_run, indent=1))


if __name__ == "__main__":
    main()
