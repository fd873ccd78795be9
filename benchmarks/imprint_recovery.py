"""A malicious server's imprint attack (attacks.imprint): share of images recovered against the expected share,
and whether the sites' model check (fl.model_check) flags every imprinted model the server sent.

The server holds a third of the source's images (its public data, never attacked) and places N brightness
bins at their quantiles; the rest are dealt into victims' batches of B images (each victim its own fresh
model, lenet-idlg behind the imprint module, 3x16x16). An image counts as recovered at SSIM >= 0.9 after the
engine's matching (metrics.privacy.match_and_score), with Wilson 95% intervals over images. Expected share:
(1 - 1/N)^(n - 1) for n images behind the update in N bins of equal mass; beside it the share of images that
really were alone in the server's bins (bins placed on public data hold unequal masses of the sites' data). Cells:
  - FedSGD, B in 8..128, bins 1x..16x B;
  - FedAvg at B = 16 and 64, bins 4x: one local step (batch B), and 4 steps (batch B/4, one epoch), lr 0.05;
  - secure aggregation of 4 sites (in-process `secagg:k=4`), 4 and 16 images each, bins 4x all images;
  - `--grid gain`: the FedAvg cells with the imprint rows at scale 0.1 instead of 1e-3;
  - `--grid steps`: FedAvg, 16 images in 4 local steps of 4, the rows' scale 1e-3..1 against spread 1e-3 and 0.1;
  - `--grid trap`: trap weights (attacks.trap) in the first layer of the `mlp`, FedSGD, B = 8, 16, 64.
Every imprinted model sent is checked by a site that agreed on the honest architecture (fingerprint) and
by one that enrolled on the imprinted model itself (weight signatures alone).

    OMP_NUM_THREADS=1 python benchmarks/imprint_recovery.py                                   # embedded set
    OMP_NUM_THREADS=1 python benchmarks/imprint_recovery.py --grid gain --name embedded-gain
    OMP_NUM_THREADS=1 python benchmarks/imprint_recovery.py --grid trap --name embedded-trap
    OMP_NUM_THREADS=1 python benchmarks/imprint_recovery.py --grid steps --name embedded-steps
    OMP_NUM_THREADS=1 python benchmarks/imprint_recovery.py --data DIR --name dermoscopy --grid short
    OMP_NUM_THREADS=1 python benchmarks/imprint_recovery.py --data DIR --grid placement --public-images 50 \
        --placement gaussian --name NAME-gaussian        # bins placed on 50 public images, FedSGD only

JSON goes to benchmarks/results/imprint_recovery_NAME.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from medpfl.attacks import ObservedUpdate, ServerPayload
from medpfl.attacks.imprint import PLACEMENTS, brightness, expected_share, imprint
from medpfl.attacks.trap import trap
from medpfl.data import ImageDataset, open_source, sample_items
from medpfl.defenses import parse_defense
from medpfl.defenses.observe import observed_gradients
from medpfl.experiments.run_dir import library_versions
from medpfl.fl.gradients import functional_model, stack_params
from medpfl.fl.local import LocalTraining, local_update
from medpfl.fl.model_check import ModelCheck, fingerprint
from medpfl.metrics.image import ssim
from medpfl.metrics.intervals import wilson
from medpfl.metrics.privacy import SUCCESS_SSIM, match_and_score
from medpfl.models.registry import build_model

MODEL, SIZE, CHANNELS = "lenet-idlg", 16, 3
MAX_ROWS = 8192  # imprint rows (victims x bins) attacked at once: bounds memory


def grid(kind: str) -> list[dict]:
    """The cells: protocol, images per site B, sites k, bins per image behind the update, local batch, and
    for `gain` the imprint rows' scale (ImprintSettings.gain) on FedAvg."""
    if kind == "trap":
        return [{"attack": "trap", "protocol": "fedsgd", "B": b, "k": 1} for b in (8, 16, 64)]
    if kind == "steps":  # several local steps: the imprint rows' scale against the spread of their gradient
        return [{"protocol": "fedavg", "B": 16, "k": 1, "m": 4, "local_batch": 4, "gain": gain, "spread": spread}
                for gain in (1e-3, 1e-2, 0.1, 1.0) for spread in (1e-3, 0.1)]
    if kind == "placement":  # FedSGD, bins 4x and 16x: where the placement of few public images matters
        return [{"protocol": "fedsgd", "B": b, "k": 1, "m": m} for b, m in ((16, 4), (16, 16), (64, 4))]
    if kind == "gain":
        return [{"protocol": "fedavg", "B": b, "k": 1, "m": 4, "local_batch": lb, "gain": 0.1} for b in (16, 64)
                for lb in (b, b // 4)]
    fedsgd = [{"protocol": "fedsgd", "B": b, "k": 1, "m": m} for b in ((8, 16, 32, 64, 128) if kind == "full"
                                                                        else (16, 64))
              for m in ((1, 2, 4, 8, 16) if kind == "full" else (4,))]
    fedavg = [{"protocol": "fedavg", "B": b, "k": 1, "m": 4, "local_batch": lb} for b in (16, 64)
              for lb in (b, b // 4)]
    secagg = [{"protocol": "fedsgd", "B": b, "k": 4, "m": 4} for b in (4, 16)]
    return fedsgd + fedavg + secagg


def run_cell(cell: dict, images: torch.Tensor, labels: torch.Tensor, public: torch.Tensor, num_classes: int,
             max_images: int, seed: int, placement: str) -> dict:
    """Attack every victim of one cell; per image, recovered or not, and whether it was alone in its bin."""
    n = cell["B"] * cell["k"]
    victims = min(len(labels), max_images) // n
    if cell.get("attack") == "trap":  # the agreed model's own first layer, trapped: no bins
        attack, model_name, bins, edges = trap(), "mlp", 1, None
    else:
        attack = imprint(bins=cell["m"] * n, placement=placement,
                         **{k: cell[k] for k in ("gain", "spread") if k in cell})
        model_name, bins = MODEL, attack.bins_for(n)
        edges = PLACEMENTS[placement](public, bins)
    chain = parse_defense(f"secagg:k={cell['k']}" if cell["k"] > 1 else "none")
    training = (LocalTraining("fedavg", 1, cell["local_batch"], 0.05) if cell["protocol"] == "fedavg"
                else LocalTraining("fedsgd"))
    ssims, alone, flagged_agreed, flagged_enrolled = [], [], 0, 0
    started = time.perf_counter()
    per_chunk = max(1, MAX_ROWS // bins)
    for first in range(0, victims, per_chunk):
        chunk = range(first, min(victims, first + per_chunk))
        x = torch.stack([images[v * n:(v + 1) * n] for v in chunk])
        y = torch.stack([labels[v * n:(v + 1) * n] for v in chunk])
        bodies = [build_model(model_name, num_classes, CHANNELS, SIZE, seed=seed * 100_003 + v) for v in chunk]
        sent = [attack.craft(body, (CHANNELS, SIZE, SIZE), public, n) for body in bodies]
        for body, model in zip(bodies, sent):
            honest = dict(body.named_parameters())
            flagged_agreed += ModelCheck(fingerprint(honest)).verify(dict(model.named_parameters())) is not None
            flagged_enrolled += ModelCheck().verify(dict(model.named_parameters())) is not None
        params = stack_params([dict(m.named_parameters()) for m in sent])
        generator = torch.Generator().manual_seed(seed)
        if cell["protocol"] == "fedsgd":
            update = observed_gradients(chain, sent[0], params, x, y, num_classes, "train", generator)
        else:
            fmodel = functional_model(sent[0])
            per_victim = [local_update(fmodel, {k: p[j] for k, p in params.items()}, x[j], y[j], num_classes,
                                       training) for j in range(len(chunk))]
            update = {k: torch.stack([u[k] for u in per_victim]) for k in per_victim[0]}
        payload = ServerPayload(sent[0], params, num_classes, (CHANNELS, SIZE, SIZE), "train", training)
        result = attack.reconstruct(payload, ObservedUpdate(update, n), generator)
        for j in range(len(chunk)):
            ssims += match_and_score(x[j], y[j], result.images[j], result.labels[j]).ssim
            if edges is not None:
                bucket = torch.bucketize(brightness(x[j]), edges, right=True)
                alone += ((bucket[:, None] == bucket[None, :]).sum(1) == 1).tolist()
    recovered = sum(s >= SUCCESS_SSIM for s in ssims)
    rate = wilson(recovered, len(ssims))
    return {**cell, "images_per_update": n, "bins": bins, "victims": victims, "images": len(ssims),
            "recovered": recovered, "share": rate.value, "low": rate.low, "high": rate.high,
            "alone_share": sum(alone) / len(alone) if alone else None,
            "expected_share": expected_share(torch.full((bins,), 1 / bins, dtype=torch.float64), n) if edges is not None
            else None,
            "check_flagged_agreed": flagged_agreed, "check_flagged_enrolled": flagged_enrolled, "models_sent": victims,
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="a source (default: the embedded set)")
    parser.add_argument("--name", default="embedded")
    parser.add_argument("--grid", choices=("full", "short", "gain", "steps", "trap", "placement"), default="full")
    parser.add_argument("--placement", choices=tuple(PLACEMENTS), default="quantiles",
                        help="where the bins go (attacks.imprint.PLACEMENTS); the tables above used quantiles")
    parser.add_argument("--public-images", type=int, default=None, help="the server's public images (default: a "
                        "third of those drawn)")
    parser.add_argument("--max-images", type=int, default=512, help="attacked images per cell, at most")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    source = open_source(args.data)
    items = sample_items(source.items, min(len(source.items), 3 * args.max_images // 2), args.seed)
    public_count = args.public_images or len(items) // 3
    dataset = ImageDataset(source, items, size=SIZE, channels=CHANNELS)
    images, labels = dataset.load_batch(range(len(items)))
    public, images, labels = images[:public_count], images[public_count:], labels[public_count:]
    # Chance level: answering with a random other image of the same data.
    generator = torch.Generator().manual_seed(args.seed)
    others = public[torch.randint(len(public), (len(images),), generator=generator)]
    chance = float((ssim(images, others) >= SUCCESS_SSIM).double().mean())
    cells = []
    for cell in grid(args.grid):
        result = run_cell(cell, images, labels, public, len(source.classes), args.max_images, args.seed,
                          args.placement)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
        cells.append(result)
    out = Path(__file__).parent / "results" / f"imprint_recovery_{args.name}.json"
    out.write_text(json.dumps({"data": args.data or "embedded", "model": MODEL, "image": [CHANNELS, SIZE, SIZE],
                               "public_images": public_count, "placement": args.placement,
                               "attacked_pool": len(labels), "seed": args.seed,
                               "success_ssim": SUCCESS_SSIM, "asr_chance": chance, "cells": cells,
                               "machine": platform.processor() or platform.machine(),
                               "versions": library_versions()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
