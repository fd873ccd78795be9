"""Throughput of the batched attack engine against two plain per-image implementations, in one process.

Both references attack one image at a time with torch.optim.LBFGS, 300 steps, a fresh sigmoid LeNet
with U(-0.5, 0.5) weights per image (attacks/reference.py):
- the paper's loop, as the papers' code runs it: all 300 `.step()` calls even after convergence, and
  the distance back-propagated into the model's parameters too (DLG's `backward()`);
- a lean loop, the same attack written with care: the gradient with respect to the image only, and
  no `.step()` once one has left the image unchanged. Same iterates, same result.
The engine attacks the same images, from the same starting points, on the same models, all victims in
one vectorised optimisation. The ratio against the paper's loop is what a user of the papers' code
gains; the ratio against the lean loop is what the batching itself brings.

    python benchmarks/attack_throughput.py                      # iDLG and CPL, 64 images, JSON to stdout
    python benchmarks/attack_throughput.py --quick --out b.json # 8 images, no scaling table: a few minutes
    python benchmarks/attack_throughput.py --attacks idlg --n-images 16 --scaling 1,8,32,128 --out b.json

Timings are wall time on a machine that may be shared: the load average before and after every phase
is recorded beside it (os.getloadavg), so a slow phase can be told from a busy machine.

Peak memory is measured around each phase: on CPU the bytes allocated through malloc (glibc's
mallinfo2, sampled; the resident set where that is missing, which misses memory freed and reused
from earlier phases), or torch.cuda.max_memory_allocated on a GPU. Each attack also reports a
ceiling: the reference's FLOPs per evaluation (counted by torch) at the machine's measured
matrix-multiply peak, i.e. how much faster the same arithmetic could run. It leaves out the
optimiser's own memory traffic (the L-BFGS history, 2 x 100 pairs of image-sized vectors read twice
per iteration), so no real code gets there.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from medpfl.attacks import DEFAULT_MODELS, ObservedUpdate, ServerPayload, build_attack
from medpfl.attacks.gradient_matching import PAPER_PROCEDURE
from medpfl.attacks.reference import reference_gradient_matching
from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.device import resolve_device
from medpfl.experiments.run_dir import library_versions
from medpfl.fl.gradients import site_gradients, stack_params
from medpfl.metrics.image import ssim
from medpfl.metrics.privacy import SUCCESS_SSIM
from medpfl.models.registry import build_model
from medpfl.seeds import ATTACK_STARTS, MODEL_WEIGHTS, stream, stream_seed

SEED = 0


def load_average() -> list[float]:
    """The machine's 1, 5 and 15-minute load averages: how many processes shared its cores."""
    return [round(x, 2) for x in os.getloadavg()]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    """glibc's mallinfo2 (2.33+), or None on other C libraries."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


class PeakMemory:
    """Peak memory in MiB above the level at entry: CUDA allocations, bytes allocated through malloc
    (where tensors live on a CPU), or else the process's resident set."""

    _mallinfo2 = _mallinfo2()

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mib = device, 0.0

    @classmethod
    def _used_mib(cls) -> float:
        if cls._mallinfo2 is not None:
            info = cls._mallinfo2()
            return (info.uordblks + info.hblkhd) / 2**20  # in use on the heap + in mmapped blocks
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._used_mib())
            time.sleep(0.005)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._peak = self._used_mib()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = self._peak - self._base


def victims(attack_name: str, images: torch.Tensor, labels: torch.Tensor, K: int, device: torch.device):
    """One fresh paper LeNet per image and the gradient each victim shares."""
    models = [build_model(DEFAULT_MODELS[attack_name], K, 3, images.shape[-1],
                          seed=stream_seed(SEED, MODEL_WEIGHTS, v)).to(device) for v in range(len(images))]
    params = stack_params([dict(m.named_parameters()) for m in models])
    x, y = images[:, None].to(device), labels[:, None].to(device)
    gradients = site_gradients(models[0], params, x, y, K)
    return models, ServerPayload(models[0], params, K, tuple(images.shape[1:])), ObservedUpdate(gradients, 1)


def quality(recon: torch.Tensor, originals: torch.Tensor) -> dict[str, float]:
    s = ssim(recon.cpu(), originals.cpu())
    return {"asr": float((s >= SUCCESS_SSIM).float().mean()), "mean_ssim": float(s.mean())}


def run_engine(attack_name: str, images, labels, K, steps, device, victims_per_batch: int) -> dict:
    attack = build_attack(attack_name, steps=steps, **PAPER_PROCEDURE)
    models, payload, update = victims(attack_name, images, labels, K, device)
    recon, seconds, evaluations = [], 0.0, []
    with PeakMemory(device) as memory:
        for lo in range(0, len(images), victims_per_batch):
            part = slice(lo, lo + victims_per_batch)
            sub_payload = ServerPayload(payload.model, {n: p[part] for n, p in payload.params.items()},
                                        K, payload.image_shape)
            sub_update = ObservedUpdate({n: g[part] for n, g in update.gradients.items()}, 1)
            result = attack.reconstruct(sub_payload, sub_update, stream(SEED, ATTACK_STARTS, lo))
            recon.append(result.images[:, 0])
            seconds += result.seconds
            evaluations += result.evaluations.tolist()
    recon = torch.cat(recon)
    return {"images_per_second": len(images) / seconds, "seconds": seconds, "peak_memory_mib": memory.peak_mib,
            "evaluations_per_image": sum(evaluations) / len(images), "evaluations": evaluations,
            "reconstructions": recon, **quality(recon, images)}


def run_reference(attack_name: str, images, labels, K, steps, device, victims_per_batch: int,
                  lean: bool = False) -> dict:
    attack = build_attack(attack_name, steps=steps, **PAPER_PROCEDURE)
    models, _, update = victims(attack_name, images, labels, K, device)
    recon, seconds, evaluations = [], 0.0, 0
    with PeakMemory(device) as memory:
        for lo in range(0, len(images), victims_per_batch):
            # The engine's starting points for this batch of victims, drawn the same way.
            starts = attack.initial_images(min(victims_per_batch, len(images) - lo), tuple(images.shape[1:]),
                                           stream(SEED, ATTACK_STARTS, lo))
            for j, start in enumerate(starts):
                v = lo + j
                observed = [update.gradients[n][v] for n, _ in models[v].named_parameters()]
                image, _, sec, ev = reference_gradient_matching(
                    models[v], observed, start[None].to(device), labels[v:v + 1].to(device), K, attack.settings,
                    lean=lean)
                recon.append(image[0])
                seconds += sec
                evaluations += ev
    recon = torch.stack(recon)
    return {"images_per_second": len(images) / seconds, "seconds": seconds, "peak_memory_mib": memory.peak_mib,
            "evaluations_per_image": evaluations / len(images), "reconstructions": recon, **quality(recon, images)}


def timed(phase):
    """Run `phase()` and add the load averages before and after it to its result."""
    before = load_average()
    result = phase()
    return {**result, "load_average_before": before, "load_average_after": load_average()}


def public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("evaluations", "reconstructions")}


def peak_matmul_gflops(device: torch.device) -> float:
    """The machine's float32 matrix-multiply rate: an upper bound for any implementation's arithmetic."""
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * 2048**3 * n / (time.perf_counter() - began) / 1e9


def flops_per_evaluation(attack_name: str, image, label, K, device) -> float:
    """Floating-point operations of one gradient-distance evaluation (forward, gradient, backward)."""
    attack = build_attack(attack_name, **PAPER_PROCEDURE)
    models, _, update = victims(attack_name, image[None], label[None], K, device)
    observed = [update.gradients[n][0] for n, _ in models[0].named_parameters()]
    start = attack.initial_images(1, tuple(image.shape), torch.Generator().manual_seed(0)).to(device)
    one_evaluation = dataclasses.replace(attack.settings, steps=1, max_iter=1)
    with FlopCounterMode(display=False) as counter:
        *_, evaluations = reference_gradient_matching(models[0], observed, start, label[None].to(device), K,
                                                      one_evaluation)
    return counter.get_total_flops() / evaluations


def ceiling(attack_name: str, reference: dict, engine: dict, image, label, K, device) -> dict:
    """How much faster than the reference the same arithmetic could attack the same images on this machine."""
    flops = flops_per_evaluation(attack_name, image, label, K, device)
    peak = peak_matmul_gflops(device)
    n = reference["n_images"]
    per_evaluation = reference["seconds"] / (reference["evaluations_per_image"] * n)
    per_evaluation_ceiling = per_evaluation / (flops / (peak * 1e9))
    # Same iterates, so the engine's count on the same images is what any implementation must evaluate:
    # it leaves out only torch's re-evaluations of an unchanged point.
    needed = sum(engine["evaluations"][:n]) / (reference["evaluations_per_image"] * n)
    return {"flops_per_evaluation": flops, "peak_matmul_gflops": peak,
            "reference_seconds_per_evaluation": per_evaluation,
            "reference_gflops": flops / per_evaluation / 1e9,
            # Every FLOP at the peak matrix-multiply rate and nothing else: no real code gets there.
            "speedup_ceiling_per_evaluation": per_evaluation_ceiling,
            "evaluations_needed_share": needed,
            "speedup_ceiling": per_evaluation_ceiling / needed}


def save(report: dict, out: Path | None) -> None:
    """Write the report so far: a long run keeps every finished measurement."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", default="idlg,cpl")
    parser.add_argument("--quick", action="store_true", help="8 images and no scaling table (a few minutes)")
    parser.add_argument("--n-images", type=int, default=None, help="images attacked (default 64; --quick: 8)")
    parser.add_argument("--reference-images", type=int, default=None,
                        help="attack only the first N images with the slow reference (default: all)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--victims-per-batch", type=int, default=64)
    parser.add_argument("--scaling", default=None,
                        help="victim counts for the scaling table ('' to skip; default 1,8,32,128, --quick: none)")
    parser.add_argument("--scaling-attack", default="idlg")
    parser.add_argument("--scaling-steps", type=int, default=30,
                        help="L-BFGS steps per scaling row (throughput per evaluation does not depend on it)")
    parser.add_argument("--device", default="auto", help="auto: the GPU if there is one, else the CPU")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.n_images is None:
        args.n_images = 8 if args.quick else 64
    if args.scaling is None:
        args.scaling = "" if args.quick else "1,8,32,128"
    device = resolve_device(args.device)

    source = embedded_source()
    K = len(source.classes)
    counts = [int(c) for c in args.scaling.split(",") if c]
    n_pool = max([args.n_images, *counts])
    items = sample_items(source.items, n_pool, seed=0)
    images, labels = ImageDataset(source, items, size=args.image_size).load_batch(range(n_pool))

    report = {"benchmark": "attack_throughput", "command": " ".join(["python", *sys.argv]),
              "n_images": args.n_images, "steps": args.steps,
              "image_size": args.image_size, "victims_per_batch": args.victims_per_batch,
              "device": str(device), "cpu_count": os.cpu_count(), "load_average_at_start": load_average(),
              "versions": library_versions(), "attacks": {}, "scaling": []}
    for name in args.attacks.split(","):
        x, y = images[:args.n_images], labels[:args.n_images]
        engine = timed(lambda: run_engine(name, x, y, K, args.steps, device, args.victims_per_batch))
        n_ref = args.reference_images or args.n_images
        # The references see the same first n_ref images, started where the engine started them.
        paper, lean = (timed(lambda lean=lean: {**run_reference(name, x[:n_ref], y[:n_ref], K, args.steps, device,
                                                                 args.victims_per_batch, lean=lean),
                                                 "n_images": n_ref})
                       for lean in (False, True))
        report["attacks"][name] = {
            "model": DEFAULT_MODELS[name], "reference": public(paper), "lean_reference": public(lean),
            "engine": {**public(engine), "n_images": args.n_images},
            # Quality on the very images the references attacked, for a like-for-like comparison.
            "engine_on_reference_images": quality(engine["reconstructions"][:n_ref], x[:n_ref]),
            # The lean loop stops early but must end where the paper's loop ends.
            "lean_vs_paper_max_pixel_difference": float((lean["reconstructions"] - paper["reconstructions"])
                                                        .abs().max()),
            "speedup_vs_paper_loop": engine["images_per_second"] / paper["images_per_second"],
            "speedup_vs_lean_reference": engine["images_per_second"] / lean["images_per_second"],
            "ceiling": ceiling(name, public(paper), engine, x[0], y[0], K, device),
            **({} if n_ref == args.n_images else {"note": "reference ran on the first reference_images images only"}),
        }
        print(json.dumps({name: report["attacks"][name]}, indent=2), flush=True)
        save(report, args.out)
    for n in counts:
        row = timed(lambda: run_engine(args.scaling_attack, images[:n], labels[:n], K, args.scaling_steps, device, n))
        report["scaling"].append({"victims": n, "steps": args.scaling_steps,
                                  "images_per_second": row["images_per_second"],
                                  "evaluations_per_second": row["evaluations_per_image"] * row["images_per_second"],
                                  "peak_memory_mib": row["peak_memory_mib"],
                                  "load_average_before": row["load_average_before"],
                                  "load_average_after": row["load_average_after"]})
        print(json.dumps(report["scaling"][-1]), flush=True)
        save(report, args.out)
    report["load_average_at_end"] = load_average()
    save(report, args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
