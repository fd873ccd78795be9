"""Plain iDLG against the strongest attacker (`--attack strongest`) per defense, at 16 px on iDLG's LeNet.

One `medpfl attack --attack strongest --defense SPEC` run per cell (one image per update, a fresh
`lenet-idlg` per victim, the attacks' default settings). Plain iDLG is one of the attacks the strongest
attacker runs, from the same random stream a separate `--attack idlg` run uses, so its column is exactly
that run's (tests/test_adaptive_attacks.py checks it) and costs nothing extra. Per cell: plain ASR, the
strongest's ASR (per image the best by SSIM: the auditor's worst case) and the ASR of the answers the
attacker picks by its own distance, each with a Wilson 95% interval, and how many images each attack won.

    OMP_NUM_THREADS=1 python benchmarks/strongest_attacker.py                          # embedded set
    OMP_NUM_THREADS=1 python benchmarks/strongest_attacker.py --data DIR --name derm   # a class folder

JSON goes to benchmarks/results/strongest_attacker_NAME.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from medpfl.experiments.attack_run import AttackRunConfig, run_attack
from medpfl.experiments.run_dir import library_versions, read_results
from medpfl.metrics.intervals import wilson
from medpfl.metrics.privacy import SUCCESS_SSIM

DEFENSES = ("none", "topk:prune=0.5", "topk:prune=0.7", "topk:prune=0.9", "quant:bits=2", "quant:bits=4",
            "laplace:b=0.01", "gaussian:sigma=0.01")


def rate(ssims: list[float]) -> dict:
    """ASR with its Wilson 95% interval."""
    hits = sum(s >= SUCCESS_SSIM for s in ssims)
    interval = wilson(hits, len(ssims))
    return {"asr": hits / len(ssims), "low": interval.low, "high": interval.high, "n": len(ssims),
            "mean_ssim": sum(ssims) / len(ssims)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="class folders (default: the embedded set)")
    parser.add_argument("--name", default="embedded")
    parser.add_argument("--defenses", default=";".join(DEFENSES), help="defense specs separated by ';'")
    parser.add_argument("--n-images", type=int, default=4)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/strongest-attacker")
    args = parser.parse_args()
    json_path = Path(f"benchmarks/results/strongest_attacker_{args.name}.json")
    for spec in args.defenses.split(";"):
        config = AttackRunConfig(attack="strongest", data=args.data, image_size=16, channels=args.channels,
                                 n_images=args.n_images, seed=args.seed, defense=spec)
        run = Path(args.out) / args.name / spec.replace(":", "-")
        started = time.perf_counter()
        summary = run_attack(config, run)
        results = sorted(read_results(run), key=lambda r: r["victim"])
        plain = [s for r in results for s in r["ssim_by_attack"]["idlg"]]
        strongest = [s for r in results for s in r["ssim"]]
        picked = [s for r in results for s in r["attacker_pick_ssim"]]
        cell = {"defense": summary["defense"], "plain": rate(plain), "strongest": rate(strongest),
                "attacker_pick": rate(picked), "wins": summary["wins"], "asr_by_attack": summary["asr_by_attack"],
                "per_image": [{"items": r["items"], "ssim_by_attack": r["ssim_by_attack"], "winner": r["winner"],
                               "attacker_pick": r["attacker_pick"]} for r in results],
                "seconds_per_image": summary["seconds_per_image"], "wall_seconds": time.perf_counter() - started}
        print(f"{cell['defense']:>20}  plain {cell['plain']['asr']:.2f}  strongest {cell['strongest']['asr']:.2f}  "
              f"picked {cell['attacker_pick']['asr']:.2f}  wins {cell['wins']}", flush=True)
        # Cells measured before (another --defenses list, another process) are kept; a defense measured again
        # replaces its cell.
        cells = json.loads(json_path.read_text())["cells"] if json_path.exists() else []
        cells = [c for c in cells if c["defense"] != cell["defense"]] + [cell]
        json_path.write_text(json.dumps({"settings": vars(args), "model": "lenet-idlg", "image_size": 16,
                                         "success_ssim": SUCCESS_SSIM, "machine": platform.machine(),
                                         "versions": library_versions(), "cells": cells}, indent=2) + "\n")


if __name__ == "__main__":
    main()
