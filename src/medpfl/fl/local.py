"""What a site does with the server's weights in one round, written once for every party that needs it.

The site trains, the in-process engine vectorises the same function over sites, the Flower client calls
it for one site, and an update-inversion attack unrolls it on dummy images: the same arithmetic
everywhere, so engines agree and the attacker simulates exactly the site's protocol (as far as the
threat model grants it the protocol's settings).

All functions are functional (torch.func): parameters are a dict name -> tensor, nothing is modified in
place, and the result is differentiable with respect to the images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from medpfl.errors import MedPFLError
from medpfl.fl.gradients import soft_cross_entropy

PROTOCOLS = ("fedsgd", "fedavg")


@dataclass(frozen=True)
class LocalTraining:
    """How a site turns the server's weights into its update.

    fedsgd: the gradient of the loss on all the site's images at the server's weights (one step).
    fedavg: `epochs` passes of minibatch SGD (batches of `batch_size` in the given image order, the last
    one smaller if needed) with learning rate `lr` and heavy-ball `momentum`; the update is the weight
    change, new weights minus the server's.

    The defaults are the bare primitive's (one pass of plain SGD), for attacks and tests that name what they
    vary; a federation's settings and their defaults are fl.settings.FederationSettings'.
    """

    protocol: str = "fedavg"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise MedPFLError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got '{self.protocol}'.")
        if self.epochs < 1:
            raise MedPFLError(f"--local-epochs {self.epochs} is invalid; a site makes 1 or more passes over its images.")
        if self.batch_size < 1:
            raise MedPFLError(f"--local-batch {self.batch_size} is invalid; a local step takes 1 or more images.")
        if not self.lr > 0:
            raise MedPFLError(f"--lr {self.lr} is invalid; the learning rate must be positive.")
        if not 0 <= self.momentum < 1:
            raise MedPFLError(f"--momentum {self.momentum} is invalid; it must be at least 0 and below 1.")

    def steps(self, n_images: int) -> int:
        """Optimiser steps a site with `n_images` images takes in one round."""
        if self.protocol == "fedsgd":
            return 1
        return self.epochs * -(-n_images // self.batch_size)


def batch_loss(model: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one batch against probability targets (one-hot for true labels)."""
    return soft_cross_entropy(functional_call(model, params, (images,)), targets)


def local_update(model: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                 num_classes: int, training: LocalTraining, create_graph: bool = False) -> dict[str, torch.Tensor]:
    """The update one site shares: its gradient (fedsgd) or weight change (fedavg) on `images` (N x C x H x W).

    `model` must be fit for torch.func (fl.gradients.functional_model). `labels` are class indices (N) or
    probability targets (N x K, e.g. an attacker's soft labels). With `create_graph` the update stays
    differentiable with respect to `images` and soft `labels`, for attacks that unroll local training.
    """
    targets = labels if labels.dim() == 2 else F.one_hot(labels, num_classes).to(images.dtype)
    step_gradient = grad(lambda p, x, t: batch_loss(model, p, x, t))
    if training.protocol == "fedsgd":
        update = step_gradient(params, images, targets)
        return update if create_graph else {n: g.detach() for n, g in update.items()}
    weights = dict(params)
    velocity = {n: torch.zeros_like(p) for n, p in params.items()}
    n = images.shape[0]
    with torch.enable_grad() if create_graph else torch.no_grad():
        for _ in range(training.epochs):
            for start in range(0, n, training.batch_size):
                batch = slice(start, start + training.batch_size)
                gradient = step_gradient(weights, images[batch], targets[batch])
                for name, g in gradient.items():
                    velocity[name] = training.momentum * velocity[name] + g
                    weights[name] = weights[name] - training.lr * velocity[name]
    update = {name: weights[name] - params[name] for name in params}
    return update if create_graph else {n: u.detach() for n, u in update.items()}
