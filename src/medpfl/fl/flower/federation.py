"""What a Flower federation runs, as plain values that travel in Flower's records (no flwr import here).

A site reads the spec from the server's message, builds the architecture, loads its own share of the data
and trains with the same functions as the in-process engine, so both engines compute the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from medpfl.data import ImageDataset, open_source, train_test_split
from medpfl.errors import MedPFLError
from medpfl.fl.local import LocalTraining
from medpfl.models.registry import build_model


@dataclass(frozen=True)
class FederationSpec:
    """A federated training run: data and its split into sites, model, local training, rounds, seed."""

    data: str = ""  # a source path; "" is the embedded real-image set
    sites: int = 2
    site_images: int = 0  # at most this many training images per site; 0 keeps each site's whole share
    model: str = "convnet"
    norm: str = "group"
    image_size: int = 16
    channels: int = 3
    rounds: int = 2
    seed: int = 0
    training: LocalTraining = field(default_factory=LocalTraining)

    def to_config(self) -> dict[str, Any]:
        """Flat str/int/float values for a Flower ConfigRecord or run config."""
        flat = {k: v for k, v in asdict(self).items() if k != "training"}
        flat.update({f"local-{k}": v for k, v in asdict(self.training).items()})
        return {k.replace("_", "-"): v for k, v in flat.items()}

    @classmethod
    def from_config(cls, config: Any) -> "FederationSpec":
        """The spec back from a ConfigRecord or run config (missing keys take the defaults)."""
        values = {k.replace("-", "_"): config[k] for k in config.keys()}
        local = {f.name: _cast(f.type, values.pop(f"local_{f.name}"))
                 for f in fields(LocalTraining) if f"local_{f.name}" in values}
        types = {f.name: f.type for f in fields(cls)}
        known = {k: _cast(types[k], v) for k, v in values.items() if k in types and k != "training"}
        return cls(**known, training=LocalTraining(**local))


def _cast(type_name: Any, value: Any) -> Any:
    # Flower's TOML run config may hand ints where floats are meant and vice versa; the dataclass says which.
    return {"int": int, "str": str, "float": float}.get(str(type_name), lambda v: v)(value)


@dataclass
class FederationData:
    """The training images of every site and the held-out test set, as tensors."""

    sites: list[tuple[torch.Tensor, torch.Tensor]]  # per site: images N x C x H x W in [0,1], labels N
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int


@lru_cache(maxsize=4)
def federation_data(spec: FederationSpec) -> FederationData:
    """Every site's images (IID shares of the training split) and the test split; cached per process."""
    source = open_source(spec.data or None)
    if spec.data:
        train, test = train_test_split(source.items, 0.2, spec.seed)
    else:  # the embedded set's recommended split keeps frames and crops of one image on one side
        train = [it for it in source.items if it.provenance.get("split") == "train"]
        test = [it for it in source.items if it.provenance.get("split") == "test"]
    if spec.sites < 1 or spec.sites > len(train):
        raise MedPFLError(f"--sites {spec.sites} does not fit {len(train)} training images; use 1 to {len(train)}.")
    train = sorted(train, key=lambda it: it.item_id)
    order = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(0,))).permutation(len(train))

    def load(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = ImageDataset(source, items, size=spec.image_size, channels=spec.channels)
        return dataset.load_batch(range(len(items)))

    shares = [order[s::spec.sites] for s in range(spec.sites)]
    if spec.site_images > 0:
        shares = [share[:spec.site_images] for share in shares]
    sites = [load([train[i] for i in share]) for share in shares]
    return FederationData(sites, load(sorted(test, key=lambda it: it.item_id)), len(source.classes))


def global_model(spec: FederationSpec, num_classes: int) -> nn.Module:
    """The architecture with the run's initial global weights."""
    return build_model(spec.model, num_classes, spec.channels, spec.image_size, norm=spec.norm, seed=spec.seed)


def site_order(seed: int, round_index: int, site: int, n_images: int) -> np.ndarray:
    """The order in which `site` visits its images in round `round_index`: the same on every engine."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, round_index, site))).permutation(n_images)


def aggregate(weights: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]], counts: list[int],
              training: LocalTraining) -> dict[str, torch.Tensor]:
    """The next global weights from the sites' updates, averaged with weights proportional to their image counts.

    fedavg: weights plus the mean weight change; fedsgd: one gradient step of `training.lr` on the mean gradient.
    """
    total = float(sum(counts))
    mean = {n: sum(u[n] * (c / total) for u, c in zip(updates, counts)) for n in weights}
    step = 1.0 if training.protocol == "fedavg" else -training.lr
    return {n: weights[n] + step * mean[n] for n in weights}


@torch.no_grad()
def accuracy(model: nn.Module, weights: dict[str, torch.Tensor], images: torch.Tensor,
             labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and balanced accuracy of `model` with `weights` on `images`."""
    model = model.eval()
    model.load_state_dict(weights, strict=False)
    predicted = model(images).argmax(1)
    hits = (predicted == labels).float()
    per_class = [hits[labels == k].mean().item() for k in labels.unique()]
    return {"accuracy": hits.mean().item(), "balanced_accuracy": float(np.mean(per_class))}


Observer = Callable[["SiteReply"], None]


@dataclass(frozen=True)
class SiteReply:
    """What the curious server holds of one site in one round: the weights it sent and the update it got back."""

    round: int
    site: int
    weights: dict[str, torch.Tensor]  # the server payload of that round
    update: dict[str, torch.Tensor]  # exactly what the site sent: gradient (fedsgd) or weight change (fedavg)
    num_examples: int
