"""How much the update-inversion attack reconstructs from a FedSGD gradient versus FedAvg weight changes.

Each site holds N real embedded images and shares one update of the global model: the FedSGD gradient
on all N, or the FedAvg weight change of E local epochs of minibatch SGD (batch B, learning rate LR).
The attacker is granted the protocol (ServerPayload.local_training) and N, recovers the labels from the
update, and runs the update-inversion attack with the same settings for every protocol. Reference in
the same run: the attack's starting points scored against the originals.

    python benchmarks/update_inversion_quality.py                      # 32px, N=4, B=2, E in {1, 5}
    python benchmarks/update_inversion_quality.py --model convnet --trained-rounds 5

With --trained-rounds R the global model is first trained for R FedAvg rounds (4 sites of 32 images
from the embedded set's train split, 1 local epoch, batch 8); the attacked sites hold test-split images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.func import vmap

from medpfl.attacks import ObservedUpdate, ServerPayload, build_attack
from medpfl.attacks.labels import recover_labels
from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.experiments.run_dir import library_versions
from medpfl.fl.gradients import functional_model, model_params
from medpfl.fl.local import LocalTraining, local_update
from medpfl.metrics.privacy import SUCCESS_SSIM, match_and_score
from medpfl.models.registry import build_model


def pretrain(model: torch.nn.Module, rounds: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    """The global model's weights after `rounds` FedAvg rounds over 4 sites of 32 train-split images."""
    source = embedded_source(split="train")
    K = len(source.classes)
    items = sample_items(source.items, 4 * 32, seed=seed + 1)
    x, y = ImageDataset(source, items, size=size).load_batch(range(4 * 32))
    x, y = x.reshape(4, 32, *x.shape[1:]), y.reshape(4, 32)
    fmodel = functional_model(model)
    training = LocalTraining("fedavg", epochs=1, batch_size=8, lr=0.05)
    params = {n: p.detach() for n, p in model.named_parameters()}
    for _ in range(rounds):
        stacked = {n: p[None].expand(4, *p.shape) for n, p in params.items()}
        updates = vmap(lambda p, a, b: local_update(fmodel, p, a, b, K, training))(stacked, x, y)
        params = {n: p + updates[n].mean(0) for n, p in params.items()}  # equal sites: plain mean
    return params


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    source = embedded_source(split="test" if args.trained_rounds else "all")
    K = len(source.classes)
    V, N, size = args.sites, args.n_images, args.image_size
    items = sample_items(source.items, V * N, seed=args.seed)
    x, y = ImageDataset(source, items, size=size).load_batch(range(V * N))
    images, labels = x.reshape(V, N, *x.shape[1:]), y.reshape(V, N)
    model = build_model(args.model, K, 3, size, norm="group", seed=args.seed)
    global_params = pretrain(model, args.trained_rounds, size, args.seed)
    params = {n: p[None].expand(V, *p.shape).clone() for n, p in global_params.items()}
    fmodel = functional_model(model)
    test = embedded_source(split="test")
    tx, ty = ImageDataset(test, test.items, size=size).load_batch(range(len(test.items)))
    with torch.no_grad():
        accuracy = float((torch.func.functional_call(fmodel, global_params, (tx,)).argmax(1) == ty).float().mean())
    settings = dict(steps=args.steps, restarts=args.restarts, lr=args.attack_lr, signed=args.signed,
                    tv_weight=args.tv_weight)
    protocols = {"fedsgd": LocalTraining("fedsgd")}
    for epochs in args.epochs:
        protocols[f"fedavg-e{epochs}"] = LocalTraining("fedavg", epochs=epochs, batch_size=args.local_batch,
                                                       lr=args.lr)
    results = {}
    for name, training in protocols.items():
        # The site's side: its update, computed from its images; ground truth stays here.
        updates = vmap(lambda p, a, b: local_update(fmodel, p, a, b, K, training))(params, images, labels)
        payload = ServerPayload(model, params, K, tuple(images.shape[2:]), local_training=training)
        update = ObservedUpdate(updates, N, labels=labels if args.labels == "granted" else None)
        attack = build_attack("update-inversion", **settings)
        start_images = attack.initial_images(V * args.restarts * N, payload.image_shape,
                                             torch.Generator().manual_seed(args.seed))
        start_images = start_images.reshape(V, args.restarts, N, *payload.image_shape)[:, 0]
        began = time.perf_counter()
        rec = attack.reconstruct(payload, update, torch.Generator().manual_seed(args.seed))
        seconds = time.perf_counter() - began
        recovered = recover_labels(update, payload)
        scores = [match_and_score(images[v], labels[v], rec.images[v], rec.labels[v]) for v in range(V)]
        starts = [match_and_score(images[v], labels[v], start_images[v], rec.labels[v]) for v in range(V)]
        ssims = [s for sc in scores for s in sc.ssim]
        results[name] = {
            "local_training": asdict(training),
            "local_steps": training.steps(N),
            "update_norm": float(torch.sqrt(sum((u.flatten(1) ** 2).sum(1) for u in updates.values())).mean()),
            "mean_ssim": statistics.fmean(ssims),
            "mean_psnr": statistics.fmean(p for sc in scores for p in sc.psnr),
            "asr": sum(s >= SUCCESS_SSIM for s in ssims) / len(ssims),
            "label_accuracy": statistics.fmean(h for v in range(V) for h in match_and_score(
                images[v], labels[v], images[v], recovered[v]).label_correct),
            "start_mean_ssim": statistics.fmean(s for sc in starts for s in sc.ssim),
            "start_mean_psnr": statistics.fmean(p for sc in starts for p in sc.psnr),
            "final_objective": rec.objective.tolist(),
            "seconds_per_image": seconds / (V * N),
            "per_image_ssim": ssims,
        }
        print(json.dumps({name: {k: v for k, v in results[name].items() if k != "per_image_ssim"}}), flush=True)
    return {"benchmark": "update_inversion_quality", "config": {**vars(args), "out": str(args.out)}, "asr_chance": 0.0,
            "global_model_test_accuracy": accuracy, "test_images": len(ty),
            "success_ssim": SUCCESS_SSIM, "results": results, "versions": library_versions(),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet-idlg")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--n-images", type=int, default=4, help="images per site (N)")
    parser.add_argument("--local-batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05, help="the sites' local learning rate")
    parser.add_argument("--epochs", type=lambda s: [int(e) for e in s.split(",")], default=[1, 5])
    parser.add_argument("--trained-rounds", type=int, default=0)
    parser.add_argument("--labels", choices=("recovered", "granted"), default="recovered")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--attack-lr", type=float, default=0.1)
    parser.add_argument("--signed", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--tv-weight", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: results/update_inversion_quality_MODEL_rROUNDS.json")
    args = parser.parse_args()
    args.out = args.out or (Path(__file__).parent / "results" /
                            f"update_inversion_quality_{args.model}_r{args.trained_rounds}.json")
    torch.set_num_threads(args.threads)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
