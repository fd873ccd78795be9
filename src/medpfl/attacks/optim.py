"""Optimisers that advance many independent victims in one vectorised step.

Every victim owns a row of a V x D tensor and its own optimiser state. An objective maps the rows
of the still-active victims to their losses and gradients in one call, so the cost of a step is one
batched evaluation however many victims there are; victims that finish drop out of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# objective(x_active, victim_index) -> (loss per victim, gradient per victim)
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class OptimResult:
    """Where each victim ended, and what it cost."""

    x: torch.Tensor  # V x D final iterates
    loss: torch.Tensor  # V, objective at the final iterate
    evaluations: torch.Tensor  # V, objective evaluations spent on each victim
    steps: torch.Tensor  # V, optimiser steps (calls of torch's .step) completed
    converged: torch.Tensor  # V bool: stopped before the step budget because nothing would move any more
    diverged: torch.Tensor  # V bool: loss or gradient became NaN/inf (x is the last finite point)


def _evaluate(objective: Objective, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = objective(x, idx)
    return loss.detach(), grad.detach()


def lbfgs(
    objective: Objective,
    x0: torch.Tensor,
    steps: int = 300,
    lr: float = 1.0,
    max_iter: int = 20,
    max_eval: int | None = None,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
    history_size: int = 100,
) -> OptimResult:
    """L-BFGS for V victims at once, each following exactly what `torch.optim.LBFGS` (no line search)
    would do over `steps` calls of `.step(closure)` on that victim alone.

    A victim stops early when torch's optimiser would no longer move it: its gradient falls under
    `tolerance_grad`, or its search direction is no longer a descent direction.
    """
    if max_eval is None:
        max_eval = max_iter * 5 // 4
    V, D = x0.shape
    dev, dt = x0.device, x0.dtype
    m = history_size
    x = x0.detach().clone()
    loss = torch.full((V,), float("nan"), device=dev, dtype=dt)
    prev_g = torch.zeros_like(x)
    prev_loss = torch.zeros(V, device=dev, dtype=dt)
    d = torch.zeros_like(x)
    t = torch.zeros(V, device=dev, dtype=dt)
    h_diag = torch.ones(V, device=dev, dtype=dt)
    # Curvature pairs in a ring buffer per victim; `head` is the oldest slot, `count` the number held.
    S = torch.zeros(V, m, D, device=dev, dtype=dt)
    Y = torch.zeros(V, m, D, device=dev, dtype=dt)
    SY = torch.zeros(V, m, m, device=dev, dtype=dt)  # SY[v, i, j] = s_i . y_j, kept up to date incrementally
    rho = torch.zeros(V, m, device=dev, dtype=dt)
    head = torch.zeros(V, dtype=torch.long, device=dev)
    count = torch.zeros(V, dtype=torch.long, device=dev)

    n_iter = torch.zeros(V, dtype=torch.long, device=dev)  # iterations over all steps (torch's state['n_iter'])
    iter_in_step = torch.zeros(V, dtype=torch.long, device=dev)
    evals_in_step = torch.zeros(V, dtype=torch.long, device=dev)
    step = torch.zeros(V, dtype=torch.long, device=dev)
    evaluations = torch.zeros(V, dtype=torch.long, device=dev)
    at_step_start = torch.ones(V, dtype=torch.bool, device=dev)  # next evaluation opens a new .step() call
    active = torch.ones(V, dtype=torch.bool, device=dev)
    diverged = torch.zeros(V, dtype=torch.bool, device=dev)
    converged = torch.zeros(V, dtype=torch.bool, device=dev)
    slots = torch.arange(m, device=dev)

    while bool(active.any()):
        idx = active.nonzero().squeeze(1)
        f, grad = _evaluate(objective, x[idx], idx)
        evaluations[idx] += 1
        bad = ~(torch.isfinite(f) & torch.isfinite(grad).all(1))
        if bool(bad.any()):
            # Step back to the last finite point so the victim's iterate stays usable for a restart.
            x[idx[bad]] -= t[idx[bad], None] * d[idx[bad]]
            diverged[idx[bad]] = True
            active[idx[bad]] = False
            keep = ~bad
            idx, f, grad = idx[keep], f[keep], grad[keep]
            if idx.numel() == 0:
                continue
        loss[idx] = f
        opt_cond = grad.abs().amax(1) <= tolerance_grad
        starting = at_step_start[idx]
        evals_in_step[idx] = torch.where(starting, 1, evals_in_step[idx] + 1)
        # After an in-step evaluation torch checks its stopping rules; any of them ends the .step() call.
        # The next call re-evaluates the same point (same loss and gradient), so that evaluation is skipped.
        moved = (d[idx] * t[idx, None]).abs().amax(1) <= tolerance_change
        flat = (f - prev_loss[idx]).abs() < tolerance_change
        ends = ~starting & (opt_cond | moved | flat | (evals_in_step[idx] >= max_eval))
        step[idx] += ends.long()
        evals_in_step[idx] = torch.where(ends, 1, evals_in_step[idx])
        iter_in_step[idx] = torch.where(ends | starting, 0, iter_in_step[idx])
        # A point whose gradient is under tolerance is final: every later .step() returns at once.
        converged[idx[opt_cond]] = True
        step[idx] += (opt_cond & starting).long()
        done = opt_cond | (step[idx] >= steps)
        active[idx[done]] = False
        idx, f, grad = idx[~done], f[~done], grad[~done]
        if idx.numel() == 0:
            continue

        first = n_iter[idx] == 0
        n_iter[idx] += 1
        iter_in_step[idx] += 1
        # Update the curvature history with the last step (not on a victim's very first iteration).
        s_new = d[idx] * t[idx, None]
        y_new = grad - prev_g[idx]
        ys = (y_new * s_new).sum(1)
        add = ~first & (ys > 1e-10)
        if bool(add.any()):
            a_idx = idx[add]
            full = count[a_idx] == m
            slot = torch.where(full, head[a_idx], (head[a_idx] + count[a_idx]) % m)
            head[a_idx] = torch.where(full, (head[a_idx] + 1) % m, head[a_idx])
            count[a_idx] = torch.where(full, count[a_idx], count[a_idx] + 1)
            s_a, y_a = s_new[add], y_new[add]
            S[a_idx, slot] = s_a
            Y[a_idx, slot] = y_a
            rho[a_idx, slot] = 1.0 / ys[add]
            SY[a_idx, slot, :] = torch.einsum("vd,vmd->vm", s_a, Y[a_idx])
            SY[a_idx, :, slot] = torch.einsum("vmd,vd->vm", S[a_idx], y_a)
            h_diag[a_idx] = ys[add] / (y_a * y_a).sum(1)
        h_diag[idx[first]] = 1.0

        direction = _two_loop(grad, S[idx], Y[idx], SY[idx], rho[idx], head[idx], count[idx], h_diag[idx], slots)
        d[idx] = direction
        prev_g[idx] = grad
        prev_loss[idx] = f
        t_first = torch.clamp(1.0 / grad.abs().sum(1), max=1.0) * lr
        t[idx] = torch.where(first, t_first, torch.full_like(t_first, lr))
        gtd = (grad * direction).sum(1)
        # Not a descent direction: torch breaks, and every later .step() recomputes the same direction.
        stuck = gtd > -tolerance_change
        active[idx[stuck]] = False
        converged[idx[stuck]] = True
        step[idx[stuck]] += 1
        idx = idx[~stuck]
        if idx.numel() == 0:
            continue
        x[idx] += t[idx, None] * d[idx]
        # At max_iter torch moves without evaluating and ends the call; the next call evaluates first.
        last = iter_in_step[idx] >= max_iter
        step[idx] += last.long()
        at_step_start[idx] = last
        finished = last & (step[idx] >= steps)
        active[idx[finished]] = False

    # The final iterate of a victim that ended on a move has no loss yet: evaluate once for the report.
    stale = ~diverged & (evaluations > 0)
    if bool(stale.any()):
        idx = stale.nonzero().squeeze(1)
        loss[idx] = _evaluate(objective, x[idx], idx)[0]
    return OptimResult(x=x, loss=loss, evaluations=evaluations, steps=step, converged=converged, diverged=diverged)


def _two_loop(
    grad: torch.Tensor,
    S: torch.Tensor,
    Y: torch.Tensor,
    SY: torch.Tensor,
    rho: torch.Tensor,
    head: torch.Tensor,
    count: torch.Tensor,
    h_diag: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """L-BFGS direction -H g for each victim, as torch's two-loop recursion computes it.

    The recursion's two sequential loops are two unit-triangular linear systems in the history
    order, so all victims and all history entries are handled by a few batched matrix products.
    """
    m = S.shape[1]
    order = (head[:, None] + slots[None, :]) % m  # order[v, i] = slot of the i-th oldest pair
    valid = slots[None, :] < count[:, None]
    r = torch.where(valid, torch.gather(rho, 1, order), 0.0)  # rho in history order, 0 for empty slots
    P = torch.gather(torch.gather(SY, 1, order[:, :, None].expand(-1, -1, m)), 2, order[:, None, :].expand(-1, m, -1))
    P = P * (valid[:, :, None] & valid[:, None, :])
    eye = torch.eye(m, device=grad.device, dtype=grad.dtype)
    q = -grad
    # First loop (newest to oldest): alpha_i = rho_i s_i.(q - sum_{j>i} alpha_j y_j).
    s_q = torch.gather(torch.einsum("vmd,vd->vm", S, q), 1, order)
    upper = eye + r[:, :, None] * torch.triu(P, diagonal=1)
    alpha = torch.linalg.solve_triangular(upper, (r * s_q)[:, :, None], upper=True, unitriangular=True)[:, :, 0]
    alpha_slots = torch.zeros_like(alpha).scatter(1, order, alpha)
    r0 = (q - torch.einsum("vm,vmd->vd", alpha_slots, Y)) * h_diag[:, None]
    # Second loop (oldest to newest): c_i = alpha_i - rho_i y_i.(r0 + sum_{j<i} c_j s_j).
    y_r0 = torch.gather(torch.einsum("vmd,vd->vm", Y, r0), 1, order)
    lower = eye + r[:, :, None] * torch.tril(P.transpose(1, 2), diagonal=-1)
    c = torch.linalg.solve_triangular(lower, (alpha - r * y_r0)[:, :, None], upper=False, unitriangular=True)[:, :, 0]
    c_slots = torch.zeros_like(c).scatter(1, order, c)
    return r0 + torch.einsum("vm,vmd->vd", c_slots, S)
