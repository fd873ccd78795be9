"""Update inversion: reconstruct a site's images from its FedAvg weight change (Geiping et al. 2020, sec. 6).

A FedAvg site shares the weight change of several local SGD steps, not a gradient. The attacker runs
the site's own local training (fl.local.local_update, with the epochs, batch size, learning rate and
momentum the payload says the server configured) on candidate images and matches the simulated weight
change to the observed one: one minus their cosine similarity plus total variation, minimised with
signed Adam, restarts and a final median filter, exactly Inverting Gradients' machinery with the
gradient replaced by the unrolled local training. On a FedSGD payload the simulated update is the
gradient itself, so the attack is Inverting Gradients on the whole update.

The order in which the site splits its images into minibatches needs no guessing: the site keeps the
same order every epoch, and which candidate lands in which batch is the attacker's free choice (scoring
matches reconstructions to originals by optimal assignment). Labels are granted or recovered from the
last layer's weight change (attacks.labels: counts, Dimitrov et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from medpfl.attacks.inverting_gradients import InvertingGradients, InvertingGradientsSettings
from medpfl.attacks.threat import ServerPayload
from medpfl.fl.local import local_update


@dataclass
class UpdateInversionSettings(InvertingGradientsSettings):
    """Inverting Gradients' settings; the cosine compares the whole weight change, every tensor of it."""

    top_layers: int | None = None


class UpdateInversion(InvertingGradients):
    """Reconstruct each site's images by matching the weight change of its simulated local training."""

    name = "update-inversion"

    def simulated_update(self, payload: ServerPayload, fmodel: torch.nn.Module) -> Callable[..., dict[str, torch.Tensor]]:
        """(params, images, targets) -> the update the site would share for these images: its local
        training as the payload describes it, unrolled and differentiable in the images."""
        training, K = payload.local_training, payload.num_classes
        return lambda params, images, targets: local_update(fmodel, params, images, targets, K, training,
                                                            create_graph=True)


def update_inversion(**overrides) -> UpdateInversion:
    """The update-inversion attack with Inverting Gradients' settings, overridden by `overrides`."""
    return UpdateInversion(UpdateInversionSettings(), **overrides)
