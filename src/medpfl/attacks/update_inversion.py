"""Update inversion: reconstruct a site's images from its FedAvg weight change (Geiping et al. 2020, sec. 6).

A FedAvg site shares the weight change of several local SGD steps, not a gradient. The attacker runs
the site's own local training (fl.local.local_update, with the epochs, batch size, learning rate and
momentum the payload says the server configured) on candidate images and matches the simulated weight
change to the observed one: one minus their cosine similarity plus total variation, minimised with
signed Adam, restarts and a final median filter, exactly Inverting Gradients' machinery with the
gradient replaced by the unrolled local training. On a FedSGD payload the simulated update is the
gradient itself, so the attack is Inverting Gradients on the whole update.

The site visits its images in one order every epoch of a round (fl.rounds), and which candidate image
lands in which minibatch is the attacker's free choice. Which labels share a minibatch is not: labels
come as a multiset (recovered from the last layer's weight change, attacks.labels, Dimitrov et al.
2022; or granted, in no particular order), and the weight change depends on how they were grouped.
So restart 0 takes the labels in the order given and every further restart a random order; the
restart with the lowest objective wins, and its order is the one reported with its images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from medpfl.attacks.inverting_gradients import InvertingGradients, InvertingGradientsSettings
from medpfl.attacks.registry import AttackEntry, register
from medpfl.attacks.threat import ServerPayload
from medpfl.fl.local import local_update


@dataclass
class UpdateInversionSettings(InvertingGradientsSettings):
    """Inverting Gradients' settings; the cosine compares the whole weight change, every tensor of it."""

    top_layers: int | None = None


class UpdateInversion(InvertingGradients):
    """Reconstruct each site's images by matching the weight change of its simulated local training."""

    name = "update-inversion"
    settings_class = UpdateInversionSettings

    def candidate_labels(self, labels: torch.Tensor, restarts: int, payload: ServerPayload,
                         generator: torch.Generator) -> torch.Tensor:
        """V x R x B: restart 0 keeps the given order, the others each try a random grouping into
        minibatches (only where there is more than one minibatch, else order does not matter)."""
        V, B = labels.shape
        orders = torch.arange(B).expand(V, restarts, B).clone()
        training = payload.local_training
        if training.protocol == "fedavg" and training.batch_size < B:
            for v in range(V):
                for r in range(1, restarts):
                    orders[v, r] = torch.randperm(B, generator=generator)
        return labels.gather(1, orders.reshape(V, -1).to(labels.device)).reshape(V, restarts, B)

    def simulated_update(self, payload: ServerPayload, fmodel: torch.nn.Module) -> Callable[..., dict[str, torch.Tensor]]:
        """(params, images, targets) -> the update the site would share for these images: its local
        training as the payload describes it, unrolled and differentiable in the images."""
        training, K = payload.local_training, payload.num_classes
        return lambda params, images, targets: local_update(fmodel, params, images, targets, K, training,
                                                            create_graph=True)


update_inversion = UpdateInversion  # update_inversion(**settings): Inverting Gradients' settings, overridden

# On the ConvNet that `medpfl train` trains by default.
register(AttackEntry(
    "update-inversion", UpdateInversion, "FedAvg weight changes: the site's local steps unrolled on candidate "
    "images, then Inverting Gradients (Geiping et al. 2020 sec. 6; Dimitrov et al. 2022)", "update inversion",
    "simulates the hospital's local training steps on a candidate image and adjusts it until the simulated weight "
    "change matches the observed one", default_model="convnet", unrolls_local_training=True))
