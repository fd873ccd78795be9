"""Where the imprint attack's expected-share curves come from, and which one our readout follows.

Our readout recovers an image exactly when it is alone in its brightness bin (attacks.imprint). With n images
falling independently into N bins of equal mass that happens with probability (1 - 1/N)^(n-1) (about e^(-1/m)
at N = m n: 0.61, 0.78, 0.94 for m = 2, 4, 16). The lower curve quoted for Robbing the Fed (about 0.44, 0.64,
0.89: breaching's analysis/imprint_guarantee.py, expected_amount) counts every occupancy pattern of n images
over N bins as equally likely (stars and bars); its share of images alone, N C(n+N-3, N-2) / C(n+N-1, N-1) / n
(breaching's figure is this minus 1/N), tends to (m / (m + 1))^2. Equally likely patterns are what
independent images give when the bins' masses are themselves a uniform random split of the data (a flat
Dirichlet), i.e. bins placed with no knowledge of the data.

This script measures, on real images, the share alone for two placements a server could use: quantiles of
its public images' brightness (ours) and breaching's Gaussian quantiles fitted to the public images' mean and
standard deviation (right when brightness is Gaussian). Batches are drawn at random from the attacked pool.

    OMP_NUM_THREADS=1 python benchmarks/imprint_expected_share.py [--data DIR --name NAME]

JSON goes to benchmarks/results/imprint_expected_share_NAME.json.
"""

from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path

import torch

from medpfl.attacks.imprint import brightness, expected_share, gaussian_edges, quantile_edges
from medpfl.data import ImageDataset, open_source, sample_items
from medpfl.metrics.intervals import wilson

SIZE, CHANNELS, BATCHES = 16, 3, 200


def equally_likely_patterns_share(bins: int, n: int) -> float:
    """Share of n images alone in their bin when every occupancy pattern over `bins` bins is equally likely."""
    return bins * comb(n + bins - 3, bins - 2) / comb(n + bins - 1, bins - 1) / n


def alone_share(measured: torch.Tensor, edges: torch.Tensor, n: int, generator: torch.Generator) -> dict:
    alone = 0
    for _ in range(BATCHES):
        bucket = torch.bucketize(measured[torch.randperm(len(measured), generator=generator)[:n]], edges, right=True)
        alone += int(((bucket[:, None] == bucket[None, :]).sum(1) == 1).sum())
    rate = wilson(alone, BATCHES * n)
    return {"share": rate.value, "low": rate.low, "high": rate.high, "images": BATCHES * n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--name", default="embedded")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    source = open_source(args.data)
    items = sample_items(source.items, len(source.items), args.seed)
    images, _ = ImageDataset(source, items, size=SIZE, channels=CHANNELS).load_batch(range(len(items)))
    public, pool = images[:len(items) // 3], images[len(items) // 3:]
    measured = brightness(pool)
    generator = torch.Generator().manual_seed(args.seed)
    cells = []
    for n in (16, 64):
        for m in (2, 4, 16):
            bins = m * n
            cell = {"batch": n, "bins": bins,
                    "independent_equal_bins": expected_share(torch.full((bins,), 1 / bins, dtype=torch.float64), n),
                    "equally_likely_patterns": equally_likely_patterns_share(bins, n),
                    "alone_public_quantiles": alone_share(measured, quantile_edges(public, bins), n, generator),
                    "alone_gaussian_fit": alone_share(measured, gaussian_edges(public, bins), n, generator)}
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    out = Path(__file__).parent / "results" / f"imprint_expected_share_{args.name}.json"
    out.write_text(json.dumps({"data": args.data or "embedded", "image": [CHANNELS, SIZE, SIZE],
                               "public_images": len(public), "pool": len(pool), "batches_per_cell": BATCHES,
                               "seed": args.seed, "cells": cells, "conclusion": __doc__.split("\n\n")[1]}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
