"""Label counts from FedAvg weight changes: which softmax estimate recovers them best, on real images.

A weight change is rescaled to the mean gradient it sums (attacks.labels.as_mean_gradient); the counts
then need the sites' mean softmax output during local training. Three estimates from random probe
images: at the start weights only (as for a gradient), the average of start and end weights, and the
one the attack uses, followed along the local steps (attacks.labels.softmax_along_local_training).
Reference in the same run: the same sites' FedSGD gradients, counted as the gradient attacks count.

    python benchmarks/fedavg_label_counts.py                       # embedded set
    python benchmarks/fedavg_label_counts.py --data DIR --name dermoscopy   # any other source
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.func import vmap

from medpfl.attacks import ObservedUpdate, ServerPayload
from medpfl.attacks.labels import as_mean_gradient, count_labels, mean_probabilities, recover_labels
from medpfl.data import ImageDataset, open_source, sample_items
from medpfl.experiments.run_dir import library_versions
from medpfl.fl.gradients import functional_model, model_params
from medpfl.fl.local import LocalTraining, local_update
from medpfl.metrics.privacy import _multiset_hits
from medpfl.models.registry import build_model

PROTOCOLS = [LocalTraining("fedsgd"), LocalTraining("fedavg", epochs=2, batch_size=2, lr=0.01),
             LocalTraining("fedavg", epochs=1, batch_size=2, lr=0.05),
             LocalTraining("fedavg", epochs=5, batch_size=2, lr=0.05)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="a data source (default: the embedded set)")
    parser.add_argument("--name", default="embedded")
    parser.add_argument("--sites", type=int, default=16)
    parser.add_argument("--n-images", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = open_source(args.data)
    V, N, size, K = args.sites, args.n_images, args.image_size, len(source.classes)
    x, y = ImageDataset(source, sample_items(source.items, V * N, seed=args.seed), size=size).load_batch(range(V * N))
    x, y = x.reshape(V, N, *x.shape[1:]), y.reshape(V, N)

    def accuracy(labels: torch.Tensor) -> float:
        return sum(sum(_multiset_hits(y[v], labels[v])) for v in range(V)) / (V * N)

    results = []
    for name in ("convnet", "lenet-idlg"):
        model = build_model(name, K, x.shape[2], size, norm="group", seed=args.seed)
        params, fmodel = model_params(model, V), functional_model(model)
        for training in PROTOCOLS:
            updates = vmap(lambda p, a, b: local_update(fmodel, p, a, b, K, training))(params, x, y)
            payload = ServerPayload(model, params, K, tuple(x.shape[2:]), local_training=training)
            update = ObservedUpdate(updates, N)
            row = {"model": name, "local_training": asdict(training), "used_by_attack": accuracy(recover_labels(update, payload))}
            if training.protocol == "fedavg":
                start = mean_probabilities(payload)
                end = mean_probabilities(replace(payload, params={n: p + updates[n] for n, p in params.items()}))
                gradient = as_mean_gradient(update, payload)
                row |= {"start": accuracy(count_labels(gradient, payload, start)),
                        "start_end_average": accuracy(count_labels(gradient, payload, (start + end) / 2))}
            results.append(row)
            print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "results" / f"fedavg_label_counts_{args.name}.json"
    out.write_text(json.dumps({"benchmark": "fedavg_label_counts", "config": vars(args), "classes": K,
                               "metric": "label accuracy, labels of a site compared as multisets",
                               "results": results, "versions": library_versions()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
