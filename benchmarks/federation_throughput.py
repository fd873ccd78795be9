"""Seconds per federated round: the in-process engine (sites side by side on the CPU's cores, its default on a
CPU) against the same sites one at a time on one thread, sites vectorised with torch.func.vmap (its default
on accelerators), and Flower's simulation runtime, in one process and run.

The configuration is the issue's: the embedded set, 5 IID sites, FedAvg with 1 local epoch, the paper's
LeNet (iDLG's) and the ConvNet (GroupNorm), 32 px. Every engine starts from the same weights and seed and
must end at the same accuracy (the JSON records each, and their largest weight difference). With
--utility it also trains the `medpfl train` defaults on IID and Dirichlet(0.3) sites (and on one site,
and at lr 0.02) and records the global model's accuracy, balanced accuracy and AUC next to their chance
levels, and the wall time.

    python benchmarks/federation_throughput.py                       # JSON to benchmarks/results/
    python benchmarks/federation_throughput.py --rounds 3 --models convnet --utility
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medpfl.data import ImageDataset
from medpfl.data.embedded import embedded_source
from medpfl.experiments.run_dir import library_versions
from medpfl.experiments.train_run import TrainRunConfig, run_training
from medpfl.fl.gradients import functional_model
from medpfl.fl.local import LocalTraining
from medpfl.fl.partition import federate
from medpfl.seeds import model_seed
from medpfl.fl.simulation import InProcessFederation
from medpfl.fl.utility import evaluate
from medpfl.models.registry import build_model

SEED = 0


def _data(sites: int, image_size: int):
    source = embedded_source()
    federation = federate(source, sites, "iid", SEED)

    def load(items):
        dataset = ImageDataset(source, list(items), size=image_size)
        return dataset.load_batch(range(len(items)))

    return [load(items) for items in federation.sites], load(federation.test), len(federation.classes)


def in_process(model_name: str, vectorise: bool, rounds: int, sites, test, num_classes: int, image_size: int,
               training: LocalTraining, workers: int | None = None) -> dict:
    """Rounds of the in-process engine; the first round (warm-up: allocation, kernel choice) is not timed."""
    net = build_model(model_name, num_classes, 3, image_size, norm="group", seed=model_seed(SEED))
    model = functional_model(net)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = InProcessFederation(model, sites, num_classes, training, SEED, vectorise=vectorise, workers=workers)
    seconds = []
    for round_index in range(1, rounds + 1):
        outcome = engine.run_round(weights, round_index)
        weights = outcome.weights
        seconds.append(outcome.seconds)
    return {"seconds_per_round": statistics.median(seconds[1:] or seconds), "rounds_timed": len(seconds[1:]),
            "first_round_seconds": seconds[0], **evaluate(model, weights, *test), "weights": weights}


# ---- FLOWER HOOK: the same configuration on Flower's simulation runtime (medpfl.fl.flower, the optional
# extra). Returns the same keys as in_process(), or None where the Flower engine is not installed.
def flower_simulation(model_name: str, rounds: int, sites: int, image_size: int,
                      training: LocalTraining) -> dict | None:
    """Seconds per round on Flower's simulation runtime, same configuration, seed and sites."""
    try:
        from medpfl.fl.flower.federation import FederationSpec
        from medpfl.fl.flower.simulation import run_simulation
    except ImportError:
        return None
    spec = FederationSpec(sites=sites, partition="iid", model=model_name, norm="group", image_size=image_size,
                          rounds=rounds, protocol=training.protocol, local_epochs=training.epochs,
                          local_batch=training.batch_size, lr=training.lr, momentum=training.momentum, seed=SEED)
    start = time.perf_counter()
    run = run_simulation(spec)
    seconds = [r["seconds"] for r in run.rounds]
    last = run.rounds[-1]
    return {"seconds_per_round": statistics.median(seconds[1:] or seconds), "rounds_timed": len(seconds[1:]),
            "first_round_seconds": seconds[0], "wall_seconds_with_startup": time.perf_counter() - start,
            **{k: last[k] for k in ("accuracy", "balanced_accuracy", "auc")}, "weights": run.weights}


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def throughput(models: list[str], rounds: int, n_sites: int, image_size: int) -> list[dict]:
    training = LocalTraining("fedavg", epochs=1, batch_size=16, lr=0.05, momentum=0.9)
    sites, test, num_classes = _data(n_sites, image_size)
    rows = []
    for model_name in models:
        engines = {"inprocess_sites_in_parallel": in_process(model_name, False, rounds, sites, test, num_classes,
                                                             image_size, training),
                   "inprocess_one_site_at_a_time": in_process(model_name, False, rounds, sites, test, num_classes,
                                                              image_size, training, workers=1),
                   "inprocess_vectorised": in_process(model_name, True, rounds, sites, test, num_classes, image_size,
                                                      training)}
        flower = flower_simulation(model_name, rounds, n_sites, image_size, training)
        if flower is not None:
            engines["flower_simulation"] = flower
        row = {"model": model_name, "rounds": rounds, "sites": n_sites, "images_per_site": [len(y) for _, y in sites],
               "training": dataclasses.asdict(training), "torch_threads": torch.get_num_threads(),
               **{name: {k: v for k, v in result.items() if k != "weights"} for name, result in engines.items()}}
        parallel = engines["inprocess_sites_in_parallel"]
        for name, result in engines.items():
            if name != "inprocess_sites_in_parallel":
                short = name.removeprefix("inprocess_")
                row[f"speedup_in_parallel_vs_{short}"] = result["seconds_per_round"] / parallel["seconds_per_round"]
                row[f"max_weight_difference_in_parallel_vs_{short}"] = _max_difference(parallel["weights"],
                                                                                       result["weights"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# The train defaults on IID and Dirichlet(0.3) sites, one site holding every training image (what federation
# costs), and a smaller learning rate (how sensitive the defaults are).
UTILITY_RUNS = [{"partition": "iid"}, {"partition": "dirichlet:0.3"}, {"partition": "iid", "sites": 1},
                {"partition": "iid", "lr": 0.02}, {"partition": "dirichlet:0.3", "lr": 0.02}]


def utility(runs: list[dict]) -> list[dict]:
    """`medpfl train` with its defaults but for `runs`' settings: final utility, chance levels, wall time."""
    rows = []
    for changes in runs:
        config = TrainRunConfig(seed=SEED, **changes)
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            summary = run_training(config, out, resume=False)
            wall = time.perf_counter() - start
            rounds = [json.loads(line) for line in (Path(out) / "rounds.jsonl").read_text().splitlines()]
        row = {**changes, "config": dataclasses.asdict(config), "wall_seconds": wall,
               "final": summary["final"], "chance": summary["chance"], "n_images": summary["n_images"],
               "accuracy_per_round": [r["accuracy"] for r in rounds]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lenet-idlg,convnet")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--utility", action="store_true",
                        help="also train the defaults on IID and Dirichlet(0.3) sites, on one site, and at lr 0.02")
    parser.add_argument("--keep-utility", action="store_true",
                        help="keep the utility section of the existing --out file (re-measure throughput only)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "federation_throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"versions": library_versions(), "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
              "throughput": throughput(args.models.split(","), args.rounds, args.sites, args.image_size)}
    if args.utility:
        report["utility"] = utility(UTILITY_RUNS)
    elif args.keep_utility and args.out.exists():
        report["utility"] = json.loads(args.out.read_text()).get("utility")
    report["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
