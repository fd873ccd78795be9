"""What the adversary holds, kept apart from the ground truth it tries to recover.

A curious server (or an eavesdropper) sees the server payload it sent (with the defenses its protocol
prescribes) and each victim's observed update. Attack code receives only these two objects; originals
and true labels stay with the scorer.
Every tensor here is stacked over victims: dimension 0 indexes the victim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from medpfl.defenses.base import Defense
from medpfl.defenses.chain import Chain
from medpfl.fl.local import LocalTraining

# The site shares the gradient of one step on all its images: what the gradient attacks were built for.
FEDSGD = LocalTraining("fedsgd")


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker is granted beyond the raw update."""

    knows_labels: bool = False  # Inverting Gradients, as the paper ran it, is handed the true labels
    knows_batch_size: bool = True
    # A malicious server sends the sites a model of its own making instead of the agreed one (imprint attacks).
    modifies_model: bool = False


@dataclass
class ServerPayload:
    """The architecture and, for each victim, the weights it computed its update on."""

    model: nn.Module  # the architecture; its own parameters are ignored in favour of `params`
    params: dict[str, torch.Tensor]  # name -> V x (parameter shape)
    num_classes: int
    image_shape: tuple[int, int, int]  # C, H, W
    bn_mode: str = "train"  # how the sites' training step runs BatchNorm: batch ("train") or running ("eval") stats
    # What the server told the sites to run (protocol, local epochs, batch size, learning rate, momentum):
    # a server configures its sites' local training, so it knows these settings as it knows the weights.
    local_training: LocalTraining = FEDSGD
    # The defenses the server configured its sites to apply, with their parameters (a top-k share, a
    # noise scale, a bit width): part of the protocol, so the attacker knows them. Never their random draws.
    defense: Chain = field(default_factory=Chain)

    def applied(self, name: str) -> Defense | None:
        """The defense called `name` (as in a defense spec: topk, quant, laplace ...) the sites apply, if any."""
        return next((d for d in self.defense.defenses if d.name == name), None)

    @property
    def n_victims(self) -> int:
        return next(iter(self.params.values())).shape[0]


@dataclass
class ObservedUpdate:
    """Exactly what the adversary holds of each victim's update, nothing more."""

    # name -> V x (parameter shape): the gradient averaged over the victim's images (FedSGD), or the weight
    # change of its local training (FedAvg), as the payload's `local_training` says
    gradients: dict[str, torch.Tensor]
    batch_size: int  # images behind each victim's update (FedAvg: all its local images, which sample-weighted
    # averaging makes every site report)
    labels: torch.Tensor | None = None  # V x B, only when the threat model grants them


@dataclass
class Reconstruction:
    """An attack's answer for each victim, and what it cost."""

    images: torch.Tensor  # V x B x C x H x W in [0,1]
    labels: torch.Tensor  # V x B recovered labels
    objective: torch.Tensor  # V, the attacker's own final objective (lower is better)
    evaluations: torch.Tensor  # V, objective (gradient) evaluations spent
    diverged: torch.Tensor  # V bool: the optimisation broke down; the images are not a real answer
    seconds: float  # wall time of the attack alone
    extra: dict = field(default_factory=dict)
