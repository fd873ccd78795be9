"""What a Flower federation runs, as plain values that travel in Flower's records (no flwr import here).

Both ends rebuild everything else from these values with the functions the in-process engine uses
(fl.partition.federate, seeds.model_seed, fl.rounds.site_update), so the engines compute the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from medpfl.data import ImageDataset, open_verified
from medpfl.fl.partition import federate, keep_per_site
from medpfl.fl.rounds import AGGREGATE  # noqa: F401  (where Flower's modules look for it)
from medpfl.fl.settings import FIELD_TYPES, FederationSettings
from medpfl.models.imprint import imprinted_architecture
from medpfl.models.registry import build_model
from medpfl.seeds import model_seed

# The architecture the server describes in a round's config: the agreed model behind this many imprint
# rows (models.imprint). 0 or absent: the agreed model. An honest server never sets it; a malicious one does.
IMPRINT_BINS_KEY = "medpfl-imprint-bins"


@dataclass(frozen=True)
class FederationSpec(FederationSettings):
    """A federated training run: data and its sites, model, local training, rounds and seed (as `medpfl train`,
    with its defaults: the federation's settings are fl.settings')."""

    data: str = ""  # a source path; "" is the embedded real-image set
    model: str = "convnet"
    model_kwargs: str = ""  # a user's module:callable model's arguments, as JSON (config records hold no dicts)
    norm: str = "group"
    image_size: int = 32
    channels: int = 3
    seed: int = 0
    defense: str = "none"  # a defense spec the sites and server run with Flower's parts (fl.flower.defenses)

    def to_config(self) -> dict[str, Any]:
        """Flat str/int/float values (hyphenated keys) for a Flower ConfigRecord or a Flower App's run config."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def of(cls, settings: Any, **overrides: Any) -> "FederationSpec":
        """The spec of any settings object with the same attribute names (e.g. `medpfl train`'s config)."""
        values = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        values = {**values, **overrides}
        values["data"] = str(values.get("data") or "")
        if isinstance(values.get("model_kwargs"), dict):
            values["model_kwargs"] = json.dumps(values["model_kwargs"], sort_keys=True) if values["model_kwargs"] else ""
        return cls(**values)

    @classmethod
    def from_config(cls, config: Any) -> "FederationSpec":
        """The spec back from a ConfigRecord or run config; keys that are no field of the spec are ignored."""
        types = {f.name: f.type for f in fields(cls)}
        values = {}
        for key in config.keys():
            name = key.replace("-", "_")
            if name in types:  # TOML run configs may hand 1 for 1.0: the field's type decides
                values[name] = FIELD_TYPES[str(types[name])](config[key])
        return cls(**values)


@dataclass
class FederationData:
    """The training images of every site and the held-out test set, as tensors."""

    sites: list[tuple[torch.Tensor, torch.Tensor]]  # per site: images N x C x H x W in [0,1], labels N
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    site_items: list[list[str]] = field(default_factory=list)  # per site: the item ids of its images, in order


@lru_cache(maxsize=4)
def federation_data(spec: FederationSpec) -> FederationData:
    """Every site's images and the test set, partitioned as the in-process engine does; cached per process."""
    source, _ = open_verified(spec.data or None)  # broken files left out, as the driver's run did
    federation = federate(source, spec.sites, spec.partition, spec.seed)

    def load(items) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = ImageDataset(source, list(items), size=spec.image_size, channels=spec.channels)
        return dataset.load_batch(range(len(items)))

    sites = keep_per_site(federation, spec.site_images, spec.seed).sites
    return FederationData([load(site) for site in sites], load(federation.test), len(federation.classes),
                          [[it.item_id for it in site] for site in sites])


def global_model(spec: FederationSpec, num_classes: int) -> nn.Module:
    """The architecture with the run's initial global weights (the in-process engine's draw)."""
    return build_model(spec.model, num_classes, spec.channels, spec.image_size, norm=spec.norm,
                       seed=model_seed(spec.seed), model_kwargs=json.loads(spec.model_kwargs or "{}"))


def received_model(spec: FederationSpec, num_classes: int, config) -> nn.Module:
    """The architecture a site builds for a round: the one the server describes in the round's config (the
    agreed model, or it behind an imprint module), as in a deployment where the server distributes the model."""
    model = global_model(spec, num_classes)
    bins = int(config.get(IMPRINT_BINS_KEY, 0))
    return model if bins == 0 else imprinted_architecture(model, (spec.channels, spec.image_size, spec.image_size),
                                                          bins)
