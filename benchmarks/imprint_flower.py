"""The imprint attack through Flower's SecAgg+: a malicious server sends the imprinted model through Flower, 4
sites of 16 images train on it (FedSGD, their model check off, to measure what it prevents) and the server reads
images out of the unmasked aggregate. Beside it, on the same images and model, the exact in-process mean of the
4 sites (medpfl attack's `secagg:k=4`), so the cost of SecAgg+'s quantization shows.

Per seed one federation (its own partition and draw of 16 images per site, its own initial lenet-idlg at
3x16x16), bins = 4 x the 64 images behind the aggregate, placed on the brightness of the server's test images
(its public data: the embedded set's 185 held-out images for every seed) at empirical quantiles or at those of
a fitted Gaussian (--placement). Images recovered at SSIM >= 0.9 after matching, Wilson 95% intervals over all
images of all seeds (the seeds draw from one pool, so a few images recur). Spreads: 0.1 (what the server uses
under SecAgg+, experiments.malicious) and the in-process default 1e-3.

With --per-site ENGINE, no secure aggregation: `medpfl train`'s malicious server (experiments.train_run, on
the in-process engine or Flower's) sends the same imprinted model and reads each site's own update of 16
images, scored per site, beside the share of each site's images alone in its bin.

    OMP_NUM_THREADS=1 python benchmarks/imprint_flower.py --seeds 6
    OMP_NUM_THREADS=1 python benchmarks/imprint_flower.py --seeds 6 --spreads 0.1 --placement gaussian \\
        --name embedded-gaussian
    OMP_NUM_THREADS=1 python benchmarks/imprint_flower.py --seeds 6 --per-site inprocess --name embedded-per-site

JSON goes to benchmarks/results/imprint_flower_NAME.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from medpfl.attacks import ObservedUpdate, ServerPayload
from medpfl.attacks.imprint import PLACEMENTS, brightness, expected_share, imprint
from medpfl.experiments.malicious import MaliciousServer
from medpfl.experiments.run_dir import library_versions
from medpfl.experiments.train_run import ATTACKS_FILE, TrainRunConfig, run_training
from medpfl.fl.flower.federation import FederationSpec, federation_data, global_model
from medpfl.fl.flower.simulation import run_simulation
from medpfl.fl.gradients import functional_model
from medpfl.fl.rounds import KeptObservations, RoundHooks, ordered, site_update
from medpfl.jsonl import read_jsonl
from medpfl.metrics.intervals import wilson
from medpfl.metrics.privacy import SUCCESS_SSIM, match_and_score
from medpfl.models.imprint import imprinted_architecture

SITES, SITE_IMAGES, BINS_PER_IMAGE, SHAPE = 4, 16, 4, (3, 16, 16)


def recovered(attack, architecture, sent, update, x, y, num_classes) -> list[bool]:
    params = {n: w[None] for n, w in sent.items()}
    result = attack.reconstruct(ServerPayload(architecture, params, num_classes, SHAPE),
                                ObservedUpdate({n: u[None] for n, u in update.items()}, len(y)),
                                torch.Generator().manual_seed(0))
    return [s >= SUCCESS_SSIM for s in match_and_score(x, y, result.images[0], result.labels[0]).ssim]


def run_seed(seed: int, spread: float, placement: str) -> dict:
    spec = FederationSpec(sites=SITES, site_images=SITE_IMAGES, rounds=1, protocol="fedsgd", model="lenet-idlg",
                          norm="none", image_size=SHAPE[1], seed=seed, defense=f"secagg:k={SITES}")
    data = federation_data(spec)
    n = SITES * SITE_IMAGES
    model = functional_model(global_model(spec, data.num_classes))
    attack = imprint(bins=BINS_PER_IMAGE * n, spread=spread, placement=placement)
    keep = KeptObservations()
    started = time.perf_counter()
    run_simulation(spec, RoundHooks(observers=[keep]), secure_aggregation=True, site_check=False,
                   tamper=MaliciousServer(attack, model, SHAPE, data.test[0], [1], n))
    seconds = time.perf_counter() - started
    (seen,) = keep.seen
    architecture = functional_model(imprinted_architecture(global_model(spec, data.num_classes), SHAPE,
                                                           attack.bins_for(n)))
    parts = [ordered(x, y, seed, 1, s) for s, (x, y) in enumerate(data.sites)]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    exact = [site_update(architecture, seen.weights, xs, ys, data.num_classes, spec.training, seed, 1, s)
             for s, (xs, ys) in enumerate(data.sites)]
    mean = {k: torch.stack([u[k] for u in exact]).mean(0) for k in exact[0]}
    return {"seed": seed, "spread": spread, "placement": placement, "images": n, "bins": attack.bins_for(n),
            "flower": recovered(attack, architecture, seen.weights, seen.update, x, y, data.num_classes),
            "in_process": recovered(attack, architecture, seen.weights, mean, x, y, data.num_classes),
            "alone": alone(x, PLACEMENTS[placement](data.test[0], attack.bins_for(n))), "flower_seconds": seconds}


def alone(images: torch.Tensor, edges: torch.Tensor) -> list[bool]:
    """Whether each image is the only one of `images` in its brightness bin."""
    bucket = torch.bucketize(brightness(images), edges, right=True)
    return ((bucket[:, None] == bucket[None, :]).sum(1) == 1).tolist()


def run_seed_per_site(seed: int, spread: float, placement: str, engine: str) -> dict:
    """medpfl train's malicious server without secure aggregation: each site's own update read and scored."""
    n = SITES * SITE_IMAGES
    bins = BINS_PER_IMAGE * n  # the bins of the SecAgg+ cells, so that the two compare on one model
    config = TrainRunConfig(model="lenet-idlg", norm="none", image_size=SHAPE[1], sites=SITES, site_images=SITE_IMAGES,
                            rounds=1, protocol="fedsgd", attack="imprint", attack_rounds=[1],
                            attack_sites=list(range(SITES)),
                            attack_settings={"bins": bins, "spread": spread, "placement": placement},
                            engine=engine, site_check=False, seed=seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run_training(config, out)
        lines = read_jsonl(Path(out) / ATTACKS_FILE)
    data = federation_data(FederationSpec.of(config))
    edges = PLACEMENTS[placement](data.test[0], bins)
    return {"seed": seed, "spread": spread, "placement": placement, "images": n, "bins": bins,
            "per_site": [s >= SUCCESS_SSIM for line in lines for s in line["ssim"]],
            "alone": [a for x, _ in data.sites for a in alone(x, edges)], "seconds": time.perf_counter() - started}


def pooled(runs: list[dict], key: str) -> dict:
    hits = [h for r in runs for h in r[key]]
    rate = wilson(sum(hits), len(hits))
    return {"recovered": sum(hits), "images": len(hits), "share": rate.value, "low": rate.low, "high": rate.high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--spreads", type=float, nargs="+", default=[0.1, 1e-3])
    parser.add_argument("--placement", choices=tuple(PLACEMENTS), default="quantiles",
                        help="bin edges from the server's test images' brightness (attacks.imprint.PLACEMENTS)")
    parser.add_argument("--per-site", choices=("inprocess", "flower"),
                        help="no secure aggregation: medpfl train's malicious server on this engine reads each site")
    parser.add_argument("--name", default="embedded")
    args = parser.parse_args()
    cells = []
    for spread in args.spreads:
        if args.per_site:
            runs = [run_seed_per_site(seed, spread, args.placement, args.per_site) for seed in range(args.seeds)]
            behind, measured = SITE_IMAGES, {"engine": args.per_site, "per_site_no_secagg": pooled(runs, "per_site")}
        else:
            runs = [run_seed(seed, spread, args.placement) for seed in range(args.seeds)]
            behind = SITES * SITE_IMAGES
            measured = {"flower_secaggplus": pooled(runs, "flower"), "in_process_secagg": pooled(runs, "in_process")}
        bins = runs[0]["bins"]
        cell = {"spread": spread, "placement": args.placement, "sites": SITES, "site_images": SITE_IMAGES, "bins": bins,
                "images_per_update": behind, **measured,
                "alone_share": sum(a for r in runs for a in r["alone"]) / sum(len(r["alone"]) for r in runs),
                "expected_share": expected_share(torch.full((bins,), 1 / bins, dtype=torch.float64), behind),
                "per_seed": [{k: (sum(v) if isinstance(v, list) else v) for k, v in r.items()} for r in runs]}
        print(json.dumps({k: v for k, v in cell.items() if k != "per_seed"}), flush=True)
        cells.append(cell)
    out = Path(__file__).parent / "results" / f"imprint_flower_{args.name}.json"
    out.write_text(json.dumps({"data": "embedded", "model": "lenet-idlg", "image": list(SHAPE), "protocol": "fedsgd",
                               "success_ssim": SUCCESS_SSIM, "seeds": args.seeds, "cells": cells,
                               "machine": platform.processor() or platform.machine(),
                               "versions": library_versions()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
