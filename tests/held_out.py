"""Test accuracy recomputed outside the code under test: a plain forward pass of the model, argmax against labels."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medpfl.data import ImageDataset, open_source
from medpfl.fl.partition import federate
from medpfl.models.registry import build_model


def accuracy_of(net: torch.nn.Module, weights: dict[str, torch.Tensor], images: torch.Tensor,
                labels: torch.Tensor) -> float:
    """Share of `images` whose highest output is the true label, with `weights` loaded into `net`."""
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert not unexpected and all(name in weights for name, _ in net.named_parameters())
    with torch.no_grad():
        return (net.eval()(images).argmax(1) == labels).double().mean().item()


def utility_cell_accuracy(cell: Path, sites: int, seed: int, image_size: int, data: str | None = None) -> float:
    """A sweep's utility cell: its final model (model.pt) on the held-out images of its federation (IID sites),
    built as the model, norm and channels its config.json names."""
    config = json.loads((cell / "config.json").read_text())["config"]
    source = open_source(data)
    federation = federate(source, sites, "iid", seed)
    channels = config.get("channels", 3)
    images, labels = ImageDataset(source, federation.test, size=image_size, channels=channels).load_batch(
        range(len(federation.test)))
    net = build_model(config["model"], len(federation.classes), channels, image_size, norm=config["norm"])
    return accuracy_of(net, torch.load(cell / "model.pt", weights_only=True), images, labels)
