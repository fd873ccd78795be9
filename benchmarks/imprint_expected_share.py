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

With --public, it compares the two placements instead over a grid of public-image counts, bins and batch
sizes: in each of --draws draws the server's public images are a fresh random subset, the rest is the attacked
pool, and the share alone is exact for batches drawn at random from that pool (no batch sampling); each cell
gives the mean over draws with a 95% interval over draws for each placement (attacks.imprint.PLACEMENTS), the
paired difference Gaussian - quantiles, and "auto" minus the better of the two in each draw.
--classes keeps some classes only (e.g. one modality of the embedded set); --crops cuts that many random square
crops (a quarter to a half of the shorter side) from the source's images, for sources of few large images:

    OMP_NUM_THREADS=1 python benchmarks/imprint_expected_share.py --data DIR --crops 2000 \
        --public 50 100 200 500 1000 --bins 64 128 256 512 --batch 16 64 --name placement-xray

JSON goes to benchmarks/results/imprint_expected_share_NAME.json.
"""

from __future__ import annotations

import argparse
import json
from math import comb, exp, lgamma
from pathlib import Path
from statistics import NormalDist

import torch

from medpfl.attacks.imprint import PLACEMENTS, brightness, expected_share, gaussian_edges, quantile_edges
from medpfl.data import ImageDataset, open_source, sample_items
from medpfl.data.transforms import to_tensor
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


def pool_alone_share(pool: torch.Tensor, edges: torch.Tensor, n: int) -> float:
    """Exact share of a batch's images alone in their bin, for n images drawn without replacement from `pool`
    (brightness values): an image whose bin holds c pool images is alone when the other n - 1 avoid its c - 1
    binmates, C(M - c, n - 1) / C(M - 1, n - 1) for a pool of M."""
    counts = torch.bincount(torch.bucketize(pool, edges, right=True)).tolist()
    total = len(pool)

    def log_choose(a: int, b: int) -> float:
        return lgamma(a + 1) - lgamma(b + 1) - lgamma(a - b + 1)

    return sum(c / total * exp(log_choose(total - c, n - 1) - log_choose(total - 1, n - 1))
               for c in counts if c and total - c >= n - 1)


def mean_interval(values: list[float]) -> dict:
    """Mean over draws and its 95% interval (normal, standard error over draws)."""
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
    half = NormalDist().inv_cdf(0.975) * sd / len(values) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half}


def random_crops(source, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random square crops of the source's images (side a quarter to a half of the shorter one)."""
    arrays = [source.load(item) for item in source.items]
    crops = []
    for _ in range(count):
        array = arrays[int(torch.randint(len(arrays), (1,), generator=generator))]
        h, w = array.shape[:2]
        side = int(min(h, w) * (0.25 + 0.25 * float(torch.rand(1, generator=generator))))
        top = int(torch.randint(h - side + 1, (1,), generator=generator))
        left = int(torch.randint(w - side + 1, (1,), generator=generator))
        crops.append(to_tensor(array[top:top + side, left:left + side], SIZE, CHANNELS))
    return torch.stack(crops)


def placement_sweep(measured: torch.Tensor, args: argparse.Namespace, generator: torch.Generator) -> list[dict]:
    """Quantiles against Gaussian over public counts x bins x batch, a fresh public draw each time."""
    cells = []
    for public_count in args.public:
        if len(measured) - public_count < 2 * max(args.batch):
            print(f"skipping {public_count} public images: the pool would be under twice the batch", flush=True)
            continue
        shares = {(bins, n): {name: [] for name in PLACEMENTS} for bins in args.bins for n in args.batch}
        for _ in range(args.draws):
            order = torch.randperm(len(measured), generator=generator)
            public, pool = measured[order[:public_count]], measured[order[public_count:]]
            # the placements take images; a 1-pixel image whose value is the brightness has the same mean
            public_images = public[:, None, None, None]
            for bins in args.bins:
                edges = {name: place(public_images, bins) for name, place in PLACEMENTS.items()}
                for n in args.batch:
                    for name in PLACEMENTS:
                        shares[bins, n][name].append(pool_alone_share(pool, edges[name], n))
        for (bins, n), by_name in shares.items():
            cell = {"public": public_count, "bins": bins, "batch": n, "pool": len(measured) - public_count,
                    "draws": args.draws,
                    "independent_equal_bins": expected_share(torch.full((bins,), 1 / bins, dtype=torch.float64), n),
                    **{name: mean_interval(values) for name, values in by_name.items()},
                    "gaussian_minus_quantiles": mean_interval([g - q for g, q in zip(by_name["gaussian"],
                                                                                     by_name["quantiles"])]),
                    "auto_minus_better": mean_interval([a - max(g, q) for a, g, q in zip(
                        by_name["auto"], by_name["gaussian"], by_name["quantiles"])])}
            print(json.dumps({k: (round(v["mean"], 3) if isinstance(v, dict) else v) for k, v in cell.items()}),
                  flush=True)
            cells.append(cell)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--name", default="embedded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", nargs="+", default=None, help="keep only these classes of the source")
    parser.add_argument("--crops", type=int, default=0, help="random square crops of the source's images instead")
    parser.add_argument("--public", type=int, nargs="+", default=None, help="compare placements at these counts")
    parser.add_argument("--bins", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--draws", type=int, default=20, help="public draws per public count")
    args = parser.parse_args()
    source = open_source(args.data)
    if args.classes:
        source.items = [item for item in source.items if item.class_name in args.classes]
    generator = torch.Generator().manual_seed(args.seed)
    if args.public:
        if args.crops:
            images = random_crops(source, args.crops, generator)
        else:
            items = sample_items(source.items, len(source.items), args.seed)
            images, _ = ImageDataset(source, items, size=SIZE, channels=CHANNELS).load_batch(range(len(items)))
        measured = brightness(images)
        cells = placement_sweep(measured, args, generator)
        out = Path(__file__).parent / "results" / f"imprint_expected_share_{args.name}.json"
        out.write_text(json.dumps({"data": args.data or "embedded", "classes": args.classes, "crops": args.crops,
                                   "image": [CHANNELS, SIZE, SIZE], "images": len(measured),
                                   "brightness": {"mean": float(measured.mean()), "std": float(measured.std()),
                                                  "skew": float(((measured - measured.mean()) ** 3).mean()
                                                                / measured.std() ** 3)},
                                   "seed": args.seed, "cells": cells}, indent=1))
        print(f"wrote {out}")
        return
    items = sample_items(source.items, len(source.items), args.seed)
    images, _ = ImageDataset(source, items, size=SIZE, channels=CHANNELS).load_batch(range(len(items)))
    public, pool = images[:len(items) // 3], images[len(items) // 3:]
    measured = brightness(pool)
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
