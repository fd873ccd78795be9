"""The paper's attacks written plainly: one victim at a time, torch.optim.LBFGS, 300 steps.

This is the yardstick the batched engine is measured against (benchmarks/attack_throughput.py) and
checked against (tests): same objective, same settings, no vectorisation. As the papers' code, it
calls `.step()` all 300 times and back-propagates the distance into the model's parameters as well
(DLG's `backward()`); `lean=True` is the same attack written with care, to the same result: the
distance differentiated with respect to the attacked variables only, and no `.step()` after one that
left them unchanged (every later one would leave them unchanged too).
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
    lean: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """One victim: L-BFGS on the squared gradient distance from `start` (B x C x H x W).

    `labels` fixes the targets (iDLG, CPL); with None a soft label from `start_label` is optimised
    (DLG). `lean`: see the module's note. Returns the images clamped to [0,1], the labels, wall
    seconds and objective evaluations. The paper's procedure only: the plain distance and torch's own
    curvature tolerance (PAPER_PROCEDURE).
    """
    if settings.normalize or settings.logit_gradient != "candidate" or settings.curvature_tolerance != 1e-10:
        raise ValueError("the reference runs the paper's procedure; pass GradientMatchingSettings(**PAPER_PROCEDURE)")
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
        if lean:
            for variable, gradient in zip(variables, torch.autograd.grad(distance, variables)):
                variable.grad = gradient
        else:
            distance.backward()
        return distance

    began = time.perf_counter()
    for _ in range(settings.steps):
        before = [v.detach().clone() for v in variables] if lean else None
        optimizer.step(closure)
        if lean and all(torch.equal(b, v) for b, v in zip(before, variables)):
            break  # converged: L-BFGS's state is deterministic, so it would stay here
    seconds = time.perf_counter() - began
    found = soft.detach().argmax(-1) if labels is None else labels
    return dummy.detach().clamp(0, 1), found, seconds, evaluations
