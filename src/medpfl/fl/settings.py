"""The federation's settings, one schema for `medpfl train`, the Flower spec, the audit and the sweep.

Every config that runs a federation (experiments.train_run.TrainRunConfig, fl.flower.FederationSpec, the
audit's `federation:` section, experiments.sweep.SweepConfig) inherits these fields, their defaults and their
checks, and every command offers them as the same options (`add_arguments`). A config that needs another
default overrides it where it is declared, saying why.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

from medpfl.errors import MedPFLError
from medpfl.fl.local import PROTOCOLS, LocalTraining
from medpfl.fl.partition import PARTITION_HELP, parse_partition

FIELD_TYPES = {"int": int, "float": float, "str": str}  # a field's annotation (a string here) -> its type


@dataclass(frozen=True)
class FederationSettings:
    """How many sites hold which images, how many rounds run, and how a site trains in each round.

    The defaults are `medpfl train`'s, the main job's: 5 IID sites, 20 rounds of FedAvg, 2 local epochs of
    batch 16, lr 0.05 with momentum 0.9. The SGD settings are plain small-CNN practice, checked on the
    embedded set against one site holding all images (centralised training, same settings: federation costs
    a few points) and against lr 0.02 (the same on IID sites, better on Dirichlet(0.3) ones, one data set
    being no ground to change a general default); the README reports the numbers.
    """

    sites: int = 5
    partition: str = "iid"  # fl.partition: iid, dirichlet:ALPHA or by:COLUMN
    site_images: int = 0  # at most this many images per site, a seeded draw from its share (0: all)
    rounds: int = 20
    protocol: str = "fedavg"
    local_epochs: int = 2
    local_batch: int = 16
    lr: float = 0.05
    momentum: float = 0.9

    def __post_init__(self) -> None:
        """Refuse a value no federation can run, in one sentence naming its option."""
        if self.sites < 1:
            raise MedPFLError(f"--sites {self.sites} is invalid; federate over 1 or more sites.")
        if self.site_images < 0:
            raise MedPFLError(f"--site-images {self.site_images} is invalid; keep 1 or more images per site, "
                              "or 0 for all.")
        if self.rounds < 1:
            raise MedPFLError(f"--rounds {self.rounds} is invalid; train for 1 or more rounds.")
        parse_partition(self.partition)
        self.training  # noqa: B018  (checks protocol, local epochs and batch, lr, momentum)

    @property
    def training(self) -> LocalTraining:
        """What each site does with the server's weights in a round."""
        return LocalTraining(self.protocol, self.local_epochs, self.local_batch, self.lr, self.momentum)

    def federation_settings(self) -> dict[str, Any]:
        """Just these settings of a config that inherits them, by field name (to build another config from)."""
        return {f.name: getattr(self, f.name) for f in fields(FederationSettings)}


_HELP = {
    "sites": "sites (hospitals) of the federation",
    "partition": f"how the training images are split over the sites: {PARTITION_HELP}",
    "site_images": "each site keeps at most N of its images, a seeded draw (0: all)",
    "rounds": "federated rounds",
    "protocol": "fedsgd: a site shares its gradient; fedavg: its weight change after local training",
    "local_epochs": "FedAvg: passes over a site's images",
    "local_batch": "FedAvg: images per local step",
    "lr": "local (FedAvg) or server (FedSGD) learning rate",
    "momentum": "FedAvg local SGD momentum, in [0, 1)",
}


def add_arguments(parser: argparse.ArgumentParser, defaults: FederationSettings) -> None:
    """The federation's options, --sites to --momentum, for every command that runs a federation.

    The help shows `defaults` (the command's own config); the options themselves default to None, so that
    `given` returns only what the user set and the command's config supplies the rest."""
    for f in fields(FederationSettings):
        parser.add_argument("--" + f.name.replace("_", "-"), type=FIELD_TYPES[str(f.type)],
                            choices=PROTOCOLS if f.name == "protocol" else None,
                            metavar="N" if f.name == "site_images" else None,
                            help=f"{_HELP[f.name]} (default: {getattr(defaults, f.name)})")


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The federation settings the user gave on the command line, by field name."""
    return {f.name: getattr(args, f.name) for f in fields(FederationSettings) if getattr(args, f.name) is not None}
