"""The gradient a site computes on its images (one FedSGD update), for many victims at once.

The same function serves the site (to produce the observed update) and the attacker (to compare a
candidate's gradient with it), so both sides differentiate exactly the same training loss.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap


BN_MODES = ("train", "eval")


def functional_model(model: nn.Module, bn_mode: str = "train") -> nn.Module:
    """A copy of `model` fit for torch.func, with BatchNorm as the site's training step runs it.

    "train": BatchNorm normalises with the batch's own statistics and tracks none (running averages
    would be updated in place, which a vectorised map over victims cannot do and which does not
    change the gradient). "eval": BatchNorm uses the model's running statistics, as the Inverting
    Gradients paper computed its updates (the network in eval mode).
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    clone = copy.deepcopy(model)
    if bn_mode == "eval":
        return clone.eval()
    clone.train()
    torch.func.replace_all_batch_norm_modules_(clone)
    return clone


def stack_params(params: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack one parameter dict per victim into name -> V x shape."""
    return {name: torch.stack([p[name].detach() for p in params]) for name in params[0]}


def model_params(model: nn.Module, n_victims: int = 1) -> dict[str, torch.Tensor]:
    """The model's own parameters repeated for `n_victims` victims that share them."""
    return {n: p.detach()[None].expand(n_victims, *p.shape).clone() for n, p in model.named_parameters()}


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against probability targets (one-hot for true labels), mean over the batch."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def parameter_gradient(
    model: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gradient of the training loss of one victim's batch w.r.t. its parameters (differentiable)."""
    return grad(lambda p: soft_cross_entropy(functional_call(model, p, (images,)), targets))(params)


def site_gradients(
    model: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor, num_classes: int,
    bn_mode: str = "train",
) -> dict[str, torch.Tensor]:
    """Each victim's shared gradient: params V x ..., images V x B x C x H x W, labels V x B."""
    fmodel = functional_model(model, bn_mode)
    targets = F.one_hot(labels, num_classes).to(images.dtype)
    per_victim = vmap(lambda p, x, t: parameter_gradient(fmodel, p, x, t))
    with torch.no_grad():
        return {n: g.detach() for n, g in per_victim(params, images, targets).items()}
