"""The update a site shares: the gradient of its training loss, as plain torch computes it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from medpfl.fl.gradients import site_gradients, stack_params
from medpfl.models.registry import build_model


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_site_gradients_equal_plain_autograd_in_either_batchnorm_mode(bn_mode):
    K, images = 3, torch.rand(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 2], [1, 1]])
    models = [build_model("convnet", K, 3, 16, seed=v) for v in range(2)]
    # Non-trivial running statistics, so eval mode is told apart from an identity normalisation.
    for model in models:
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    params = stack_params([dict(m.named_parameters()) for m in models])
    shared = site_gradients(models[0], params, images, labels, K, bn_mode)
    for v, model in enumerate(models):
        plain = copy.deepcopy(models[0])  # the architecture and buffers the server sent, this victim's weights
        plain.load_state_dict({**plain.state_dict(), **dict(model.named_parameters())})
        plain.train(bn_mode == "train")
        loss = F.cross_entropy(plain(images[v]), labels[v])
        expected = torch.autograd.grad(loss, list(plain.parameters()))
        for (name, _), g in zip(plain.named_parameters(), expected):
            assert torch.allclose(shared[name][v], g, atol=1e-6), f"{name} of victim {v} in {bn_mode} mode"
