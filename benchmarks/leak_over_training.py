"""How leakage changes over federated training: round 1 against a late round, FedSGD against FedAvg of 1 or 5
local epochs, on a multi-class task (the embedded set's six modalities) and a binary one (its CT and MR images
as a two-class folder).

Runs `medpfl train` (the paper's LeNet `lenet-idlg`, 5 IID sites, seed 0) with a curious server that attacks a
probe update of one image from every site at the first and the last round (FedSGD: 50 rounds, FedAvg: 10):
iDLG on FedSGD gradients, the update-inversion attack on FedAvg weight changes. Every run directory resumes,
so a killed benchmark continues; then one JSON with ASR, SSIM, PSNR and label accuracy per run and attacked
round, beside the global model's test accuracy at that round and the chance levels.

    python benchmarks/leak_over_training.py --out runs/leak-over-training
    python benchmarks/leak_over_training.py --protocols fedsgd-idlg --quick      # a quick look

Each run is the `medpfl train` command with the same settings, e.g. for the binary FedAvg of 5 epochs:
    medpfl train --data OUT/ct-mr-data --model lenet-idlg --sites 5 --rounds 10 --protocol fedavg --local-epochs 5
      --attack update-inversion --attack-rounds 1,10 --attack-sites 0,1,2,3,4 --attack-batch 1
      --steps 300 --set restarts=1 --set signed=false --set tv_weight=0.01
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from medpfl.data.embedded import embedded_source
from medpfl.experiments.train_run import TrainRunConfig, run_training

BINARY = ("CT", "MR")
# Update inversion as benchmarks/update_inversion_quality.py runs it: 300 plain Adam steps, TV 1e-2, one start
# (its defaults are Inverting Gradients': 24,000 signed steps and 8 restarts, hours per image on a CPU).
INVERSION = {"restarts": 1, "signed": False, "tv_weight": 0.01, "steps": 300}
# name: protocol, settings beyond `medpfl train`'s defaults (FedAvg: batch 16, lr 0.05, momentum 0.9), attack,
# rounds (a FedSGD round is one gradient step, so it gets more of them to train the model as far)
RUNS = {"fedsgd-idlg": ("fedsgd", {"lr": 0.1}, "idlg", 50),
        "fedavg-e1-ui": ("fedavg", {"local_epochs": 1, "attack_settings": INVERSION}, "update-inversion", 10),
        "fedavg-e5-ui": ("fedavg", {"local_epochs": 5, "attack_settings": INVERSION}, "update-inversion", 10)}
TASKS = {"multiclass": "embedded", "binary": "ct-mr"}  # task: the run directories' prefix


def binary_folder(root: Path) -> Path:
    """The embedded set's CT and MR images as a two-class folder of PNGs: a binary task any user could hand in."""
    from PIL import Image

    if root.exists():
        return root
    source = embedded_source()
    for item in source.items:
        if item.class_name in BINARY:
            folder = root / item.class_name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (np.clip(source.load(item), 0, 1) * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / (item.item_id.replace("/", "_") + ".png"))
    return root


def summarise(run: Path) -> list[dict]:
    """Per attacked round: the attack's scores over the attacked sites and the global model's utility."""
    attacks = [json.loads(line) for line in (run / "attacks.jsonl").read_text().splitlines()]
    rounds = {r["round"]: r for r in map(json.loads, (run / "rounds.jsonl").read_text().splitlines())}
    summary = json.loads((run / "summary.json").read_text())
    rows = []
    for round_index in sorted({a["round"] for a in attacks}):
        hit = [a for a in attacks if a["round"] == round_index]
        ssim = [s for a in hit for s in a["ssim"]]
        rows.append({"round": round_index, "victims": len(ssim), "asr": statistics.mean(s >= 0.9 for s in ssim),
                     "mean_ssim": statistics.mean(ssim), "mean_psnr": statistics.mean(p for a in hit for p in a["psnr"]),
                     "label_accuracy": statistics.mean(c for a in hit for c in a["label_correct"]),
                     "attack_seconds_per_image": statistics.mean(a["seconds"] for a in hit),
                     "test_accuracy_after_round": rounds[round_index]["accuracy"],
                     "test_auc_after_round": rounds[round_index]["auc"]})
    return [{**row, "chance": summary.get("chance")} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/leak-over-training")
    parser.add_argument("--quick", action="store_true", help="3 rounds per run instead of 50 (FedSGD) and 10")
    parser.add_argument("--protocols", default=",".join(RUNS), help=f"a subset of {','.join(RUNS)}")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--binary-data", help="where the two-class folder is written (default: OUT/ct-mr-data)")
    parser.add_argument("--json", default="benchmarks/results/leak_over_training.json")
    args = parser.parse_args()
    out = Path(args.out)
    binary = Path(args.binary_data or out / "ct-mr-data")
    data = {"multiclass": None, "binary": str(binary_folder(binary)) if "binary" in args.tasks else None}
    results = []
    for task in args.tasks.split(","):
        for name in args.protocols.split(","):
            protocol, settings, attack, rounds = RUNS[name]
            rounds = 3 if args.quick else rounds
            config = TrainRunConfig(data=data[task], model="lenet-idlg", sites=5, rounds=rounds,
                                    protocol=protocol, attack=attack, attack_rounds=[1, rounds],
                                    attack_sites=list(range(5)), attack_batch=1, **settings)
            run = out / f"{TASKS[task]}-{name}"
            run_training(config, run)
            for row in summarise(run):
                results.append({"task": task, "run": name, "protocol": protocol,
                                "local_epochs": config.local_epochs if protocol == "fedavg" else None,
                                "attack": attack, **row})
                print(json.dumps(results[-1]))
    Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
