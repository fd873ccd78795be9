"""Inverting Gradients with and without GradInversion's BatchNorm-statistics prior (`--set bn_prior=W`).

The known case: ResNet-18 with BatchNorm in eval mode (as the Inverting Gradients paper computed updates) whose
running statistics are the attacked batch's own feature statistics (tests/test_inverting_gradients.py builds it),
one update of 2 real images at 16 px, labels granted (as the paper's threat). Two sets of images: the embedded
set's first two of its seeded draw of 4, and two crops of scikit-image's fundus photograph (the tests' crops).
Per prior weight: each image's SSIM (matched as `medpfl attack` scores) and the wall time.

    OMP_NUM_THREADS=1 python benchmarks/batchnorm_prior.py --steps 20 --weights 0,0.001

JSON goes to benchmarks/results/batchnorm_prior_STEPSsteps.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from medpfl.attacks import ObservedUpdate, ServerPayload, build_attack
from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.experiments.run_dir import library_versions
from medpfl.fl.gradients import model_params, site_gradients
from medpfl.metrics.privacy import match_and_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_inverting_gradients import resnet_holding_statistics_of  # noqa: E402


def image_sets() -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """name -> (2 images, their labels, classes)."""
    import numpy as np
    from skimage import data

    from medpfl.data.transforms import to_tensor

    source = embedded_source()
    x, y = ImageDataset(source, sample_items(source.items, 4, seed=0), size=16).load_batch(range(4))
    retina = data.retina().astype(np.float32) / 255.0
    crops = torch.stack([to_tensor(retina[r:r + 400, c:c + 400], 16, 3) for r, c in [(600, 600), (200, 900)]])
    return {"embedded": (x[:2], y[:2], len(source.classes)), "retina": (crops, torch.tensor([0, 1]), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--weights", default="0,0.001")
    args = parser.parse_args()
    cells = []
    for name, (images, labels, K) in image_sets().items():
        model = resnet_holding_statistics_of(images, K)
        params = model_params(model, 1)
        update = ObservedUpdate(site_gradients(model, params, images[None], labels[None], K, "eval"), len(labels),
                                labels=labels[None])
        payload = ServerPayload(model, params, K, tuple(images.shape[1:]), bn_mode="eval")
        for weight in [float(w) for w in args.weights.split(",")]:
            started = time.perf_counter()
            result = build_attack("invgrad", steps=args.steps, restarts=args.restarts, bn_prior=weight).reconstruct(
                payload, update, torch.Generator().manual_seed(0))
            score = match_and_score(images, labels, result.images[0], result.labels[0])
            cells.append({"images": name, "bn_prior": weight, "ssim": score.ssim,
                          "seconds": time.perf_counter() - started})
            print(cells[-1], flush=True)
    path = Path(f"benchmarks/results/batchnorm_prior_{args.steps}steps.json")
    path.write_text(json.dumps({"settings": vars(args), "model": "resnet18 (BatchNorm, eval)", "image_size": 16,
                                "machine": platform.machine(), "versions": library_versions(), "cells": cells},
                               indent=2) + "\n")


if __name__ == "__main__":
    main()
