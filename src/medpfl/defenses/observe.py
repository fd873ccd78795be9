"""What the server observes of sites' updates under a defense chain: computed, defended, then aggregated."""

from __future__ import annotations

import torch
from torch import nn

from medpfl.defenses.base import Update
from medpfl.defenses.chain import Chain
from medpfl.fl.gradients import site_gradients


def observed_gradients(chain: Chain, model: nn.Module, params: Update, images: torch.Tensor, labels: torch.Tensor,
                       num_classes: int, bn_mode: str, generator: torch.Generator) -> Update:
    """Each victim's update as the server sees it: params V x ..., images V x (k B) x C x H x W, labels V x (k B).

    Under secure aggregation over k sites, a victim's k B images are k sites' batches of B on the
    victim's model; the server receives only their mean."""
    k = chain.sites_per_update
    V, kB = labels.shape
    B = kB // k
    site_images = images.reshape(V * k, B, *images.shape[2:])
    site_labels = labels.reshape(V * k, B)
    site_params = {n: p.repeat_interleave(k, dim=0) for n, p in params.items()}
    if chain.local is not None:
        computed = chain.local.site_gradients(model, site_params, site_images, site_labels, num_classes, generator)
    else:
        computed = site_gradients(model, site_params, site_images, site_labels, num_classes, bn_mode)
    return chain.observe(computed, generator)
