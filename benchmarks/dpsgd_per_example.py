"""Per-example gradients for DP-SGD: torch.func (vmap of grad, what medpfl uses) against Opacus's GradSampleModule.

Both compute the clipped sum of per-example gradients of the same model on the same real images; the
script checks they agree and times each (median of several repetitions, after a warm-up).

    python benchmarks/dpsgd_per_example.py --out benchmarks/results/dpsgd_per_example_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.defenses import DPSGD, per_example_gradients
from medpfl.experiments.run_dir import library_versions
from medpfl.models.registry import build_model


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="lenet-idlg,convnet")
    parser.add_argument("--out")
    args = parser.parse_args()
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    source = embedded_source()
    B, clip = args.batch_size, 1.0
    x, y = ImageDataset(source, sample_items(source.items, B, seed=0), size=args.image_size).load_batch(range(B))
    K = len(source.classes)
    rows = []
    for name in args.models.split(","):
        model = build_model(name, K, 3, args.image_size, norm="group", seed=0)
        params = {n: p.detach() for n, p in model.named_parameters()}
        targets = F.one_hot(y, K).float()
        dp = DPSGD(noise_multiplier=0.0, clip=clip)

        def ours():
            with torch.no_grad():
                return dp.private_gradient(per_example_gradients(model, params, x, targets), torch.Generator(), 1)

        wrapped = GradSampleModule(copy.deepcopy(model))
        optimizer = DPOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.1), noise_multiplier=0.0,
                                max_grad_norm=clip, expected_batch_size=B)

        def opacus():
            optimizer.zero_grad()
            F.cross_entropy(wrapped(x), y).backward()
            optimizer.pre_step()
            return [p.summed_grad for p in wrapped.parameters()]

        mine, theirs = ours(), opacus()
        max_diff = max((mine[n] - t).abs().max().item() for n, t in zip(mine, theirs))
        t_ours, t_opacus = time_it(ours, args.repeats), time_it(opacus, args.repeats)
        rows.append({"model": name, "batch_size": B, "image_size": args.image_size, "torch_func_s": t_ours,
                     "opacus_s": t_opacus, "speedup_torch_func": t_opacus / t_ours, "max_abs_difference": max_diff})
        print(json.dumps(rows[-1]))
    result = {"benchmark": "dpsgd_per_example", "threads": torch.get_num_threads(), "rows": rows,
              "versions": library_versions()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
