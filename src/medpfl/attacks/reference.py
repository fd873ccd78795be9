"""The paper's attacks written plainly: one victim at a time, torch.optim.LBFGS, 300 steps.

This is the yardstick the batched engine is measured against (benchmarks/attack_throughput.py) and
checked against (tests): same objective, same settings, no vectorisation.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from medpfl.attacks.gradient_matching import GradientMatchingSettings
from medpfl.fl.gradients import soft_cross_entropy


def reference_gradient_matching(
    model: nn.Module,
    observed: list[torch.Tensor],
    start: torch.Tensor,
    labels: torch.Tensor | None,
    num_classes: int,
    settings: GradientMatchingSettings,
    start_label: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """One victim: L-BFGS on the squared gradient distance from `start` (B x C x H x W).

    `labels` fixes the targets (iDLG, CPL); with None a soft label from `start_label` is optimised
    (DLG). Returns the images clamped to [0,1], the labels, wall seconds and objective evaluations.
    """
    params = list(model.parameters())
    dummy = start.clone().requires_grad_(True)
    variables = [dummy]
    if labels is None:
        soft = start_label.clone().requires_grad_(True)
        variables.append(soft)
    else:
        targets = F.one_hot(labels, num_classes).to(start.dtype)
    optimizer = torch.optim.LBFGS(variables, lr=settings.lr, max_iter=settings.max_iter,
                                  history_size=settings.history_size, tolerance_grad=settings.tolerance_grad,
                                  tolerance_change=settings.tolerance_change)
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad()
        target = soft.softmax(-1) if labels is None else targets
        loss = soft_cross_entropy(model(dummy), target)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        distance = sum(((g - o) ** 2).sum() for g, o in zip(grads, observed))
        distance.backward()
        return distance

    began = time.perf_counter()
    for _ in range(settings.steps):
        optimizer.step(closure)
    seconds = time.perf_counter() - began
    found = soft.detach().argmax(-1) if labels is None else labels
    return dummy.detach().clamp(0, 1), found, seconds, evaluations
