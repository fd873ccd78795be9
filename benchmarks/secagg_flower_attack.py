"""iDLG against secure aggregation over K = 2 sites: Flower's SecAgg+ in real simulations against the in-process
simulation of its outcome (`secagg:k=2`), on the same images and models, in the same run.

Each victim pair is one Flower simulation (`run_simulation(..., secure_aggregation=True)`): 2 sites holding one
image each (`FederationSpec.site_images=1`, a seeded draw from each site's share), FedSGD, one round, the paper's
LeNet (`lenet-idlg`) at 3x32x32; the run's seed draws a fresh model per pair, as `medpfl attack` draws a fresh
model per victim. The curious server's observer receives only what SecAgg+ leaves it, the sites' mean update
(site AGGREGATE); iDLG with the attack engine's defaults attacks it as ONE update of 2 images, scored against
the union of both sites' images. The reference: the same images and the weights the server sent, through the
in-process secure aggregation (defenses.observe), attacked with the same attacker's stream. Seeds whose
images repeat an earlier pair's are passed over.

    OMP_NUM_THREADS=1 python benchmarks/secagg_flower_attack.py              # 8 pairs, 16 images
    OMP_NUM_THREADS=1 python benchmarks/secagg_flower_attack.py --pairs 2    # a quick look

JSON goes to benchmarks/results/secagg_flower_attack.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from medpfl.attacks import ObservedUpdate, ServerPayload, build_attack
from medpfl.data import ImageDataset
from medpfl.data.embedded import embedded_source
from medpfl.defenses import parse_defense
from medpfl.defenses.observe import observed_gradients
from medpfl.experiments.run_dir import library_versions
from medpfl.fl.flower.federation import AGGREGATE, FederationSpec, federation_data, global_model
from medpfl.fl.flower.secagg import CLIPPING_RANGE
from medpfl.fl.flower.simulation import run_simulation
from medpfl.fl.gradients import functional_model
from medpfl.fl.rounds import KeptObservations, RoundHooks
from medpfl.metrics.image import ssim
from medpfl.metrics.privacy import SUCCESS_SSIM, match_and_score

K = 2  # sites under secure aggregation


def flower_pairs(n_pairs: int, first_seed: int, image_size: int) -> list[dict]:
    """One SecAgg+ simulation per pair: what the server observed, and (for scoring only) the images behind it."""
    pairs, used = [], set()
    seed = first_seed
    while len(pairs) < n_pairs:
        spec = FederationSpec(sites=K, site_images=1, rounds=1, model="lenet-idlg", image_size=image_size,
                              channels=3, protocol="fedsgd", lr=0.05, seed=seed)
        data = federation_data(spec)
        items = [i for site in data.site_items for i in site]
        seed += 1
        if used & set(items):
            continue
        used |= set(items)
        recorder = KeptObservations()
        started = time.perf_counter()
        run_simulation(spec, RoundHooks(observers=[recorder]), secure_aggregation=True, cpus=K)
        seconds = time.perf_counter() - started
        assert [o.facts.site for o in recorder.seen] == [AGGREGATE], "SecAgg+ must leave the server the aggregate only"
        pairs.append({"spec": spec, "seen": recorder.seen[0], "items": items, "num_classes": data.num_classes,
                      "images": torch.cat([x for x, _ in data.sites]), "labels": torch.cat([y for _, y in data.sites]),
                      "simulation_seconds": seconds})
    return pairs


def attack(pairs: list[dict], updates: list[dict[str, torch.Tensor]], seed: int) -> dict:
    """iDLG (engine defaults) on every pair's update at once, one victim per pair; scored per image."""
    model = global_model(pairs[0]["spec"], pairs[0]["num_classes"])
    params = {n: torch.stack([p["seen"].weights[n] for p in pairs]) for n in pairs[0]["seen"].weights}
    payload = ServerPayload(model, params, pairs[0]["num_classes"], tuple(pairs[0]["images"].shape[1:]), "train")
    observed = ObservedUpdate({n: torch.stack([u[n] for u in updates]) for n in updates[0]}, K)
    result = build_attack("idlg").reconstruct(payload, observed, torch.Generator().manual_seed(seed))
    per_pair = []
    for j, p in enumerate(pairs):
        score = match_and_score(p["images"], p["labels"], result.images[j].cpu(), result.labels[j].cpu())
        per_pair.append({"items": p["items"], "labels": p["labels"].tolist(),
                         "recovered_labels": result.labels[j].tolist(), "ssim": score.ssim, "psnr": score.psnr,
                         "label_correct": score.label_correct})
    ssims = [s for r in per_pair for s in r["ssim"]]
    return {"asr": sum(s >= SUCCESS_SSIM for s in ssims) / len(ssims), "mean_ssim": statistics.fmean(ssims),
            "mean_psnr": statistics.fmean(p for r in per_pair for p in r["psnr"]),
            "label_accuracy": statistics.fmean(h for r in per_pair for h in r["label_correct"]),
            "seconds_per_image": result.seconds / len(ssims), "pairs": per_pair}


def chance_levels(pairs: list[dict], image_size: int, seed: int) -> dict:
    """An attacker answering with random images of the same data and random labels: ASR, SSIM, label accuracy."""
    source = embedded_source()
    gallery = ImageDataset(source, source.items, size=image_size, channels=3)
    generator = torch.Generator().manual_seed(seed)
    originals = torch.cat([p["images"] for p in pairs])
    ids = [i for p in pairs for i in p["items"]]
    picks = []
    while len(picks) < len(ids):  # a random image of the set other than the original itself
        j = int(torch.randint(len(source.items), (1,), generator=generator))
        if source.items[j].item_id != ids[len(picks)]:
            picks.append(j)
    guess = ssim(originals, torch.stack([gallery.image(j) for j in picks]))
    hits = []
    for p in pairs:
        for _ in range(1000):
            labels = torch.randint(p["num_classes"], (K,), generator=generator).tolist()
            hits.append(sum((Counter(labels) & Counter(p["labels"].tolist())).values()) / K)
    return {"asr": float((guess >= SUCCESS_SSIM).float().mean()), "mean_ssim": float(guess.mean()),
            "label_accuracy": statistics.fmean(hits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="the first pair's seed; pair p takes the next unused")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "secagg_flower_attack.json")
    args = parser.parse_args()

    started = time.perf_counter()
    pairs = flower_pairs(args.pairs, args.seed, args.image_size)
    flower_seconds = time.perf_counter() - started
    chain = parse_defense(f"secagg:k={K}")
    reference = []
    for p in pairs:  # the in-process simulation of SecAgg's outcome, on the weights the server sent
        model = functional_model(global_model(p["spec"], p["num_classes"]))
        params = {n: w[None] for n, w in p["seen"].weights.items()}
        update = observed_gradients(chain, model, params, p["images"][None], p["labels"][None], p["num_classes"],
                                    "train", torch.Generator().manual_seed(0))
        reference.append({n: u[0] for n, u in update.items()})
    flower_updates = [p["seen"].update for p in pairs]
    gap = max((f[n] - r[n]).abs().max().item() for f, r in zip(flower_updates, reference) for n in f)
    largest = max(r[n].abs().max().item() for r in reference for n in r)
    attack_seed = args.seed + 1_000_003
    results = {
        "what": "iDLG (engine defaults) on the aggregate of K=2 sites of one image each, lenet-idlg, FedSGD, "
                f"3x{args.image_size}x{args.image_size}; Flower SecAgg+ simulations vs in-process secagg:k=2 "
                "on the same images, weights and attacker stream",
        "command": f"python benchmarks/secagg_flower_attack.py --pairs {args.pairs} --seed {args.seed} "
                   f"--image-size {args.image_size}",
        "pairs": len(pairs), "images": K * len(pairs), "seeds": [p["spec"].seed for p in pairs],
        "flower_secagg": attack(pairs, flower_updates, attack_seed),
        "inprocess_secagg": attack(pairs, reference, attack_seed),
        "chance": chance_levels(pairs, args.image_size, args.seed),
        "max_abs_difference_flower_vs_inprocess_update": gap,
        "max_abs_update_entry": largest, "secaggplus_clipping_range": CLIPPING_RANGE,
        "simulation_seconds": [p["simulation_seconds"] for p in pairs],
        "flower_seconds_total": flower_seconds, "total_seconds": time.perf_counter() - started,
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "versions": library_versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for name in ("flower_secagg", "inprocess_secagg", "chance"):
        r = results[name]
        print(f"{name:17s} ASR {r['asr']:.2f}  mean SSIM {r['mean_ssim']:.3f}  "
              f"label accuracy {r['label_accuracy']:.2f}")
    print(f"update gap {gap:.2e} (largest entry {largest:.2f}); {results['total_seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
