"""Optimisers that advance many independent victims in one vectorised step.

Every victim owns a row of a V x D tensor and its own optimiser state. An objective maps the rows
of the still-active victims to their losses and gradients in one call, so the cost of a step is one
batched evaluation however many victims there are; victims that finish drop out of the batch.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

# objective(x_active, victim_index) -> (loss per victim, gradient per victim)
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class OptimResult:
    """Where each victim ended (its best run, when it ran more than once), and what it cost."""

    x: torch.Tensor  # V x D final iterates
    loss: torch.Tensor  # V, objective at the final iterate (NaN when every run diverged)
    evaluations: torch.Tensor  # V, objective evaluations spent on each victim, all runs together
    steps: torch.Tensor  # V, optimiser steps (calls of torch's .step) of the kept run
    converged: torch.Tensor  # V bool: the kept run stopped early because nothing would move any more
    diverged: torch.Tensor  # V bool: every run's loss or gradient became NaN/inf (x: a last finite point)
    runs: torch.Tensor  # V, how many runs the victim had (1 + its restarts)
    # V, runs that ended at their first evaluation (gradient already under tolerance at the start): such a
    # run never moved, so it is no answer; a restart treats it as unsatisfied whatever its loss.
    stalled: torch.Tensor


@dataclass
class Restart:
    """Start a finished victim again from a fresh point while the others keep running.

    A victim runs again while its best run so far diverged or is `unsatisfied` with it, up to `tries`
    more runs. Restarting in place keeps the batch full: no victim waits for the slowest one.
    """

    tries: int
    unsatisfied: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (victims, best loss) -> bool each
    draw: Callable[[int], torch.Tensor]  # n fresh starting points, n x D


class Checkpoint:
    """A file in which a long optimisation keeps its state, so that a crash costs at most `every_seconds`
    of work: written atomically now and then, read back on the next start if it is the same job's (`key`)."""

    def __init__(self, path: str | os.PathLike[str], key: str, every_seconds: float = 300.0) -> None:
        self.path, self.key, self.every_seconds = Path(path), key, every_seconds
        self._saved_at = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """The state saved by this job, or None (no file, another job's, or unreadable)."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file means the same: start over
            warnings.warn(f"Ignoring the unreadable checkpoint {self.path} ({exc}); this batch starts over.")
            return None
        return saved["state"] if saved.get("key") == self.key else None

    def due(self) -> bool:
        return time.monotonic() - self._saved_at >= self.every_seconds

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"key": self.key, "state": state}, tmp)
        os.replace(tmp, self.path)
        self._saved_at = time.monotonic()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class _Rows:
    """Per-run optimiser state of the runs in progress, one row each.

    Rows of finished runs are dropped at once, so every tensor op of a step touches only running
    victims and the (large) curvature history is never gathered or copied on the way.
    """

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.__dict__.update(tensors)

    def keep(self, mask: torch.Tensor) -> None:
        for name, value in list(self.__dict__.items()):
            setattr(self, name, value[mask])

    def extend(self, other: "_Rows") -> None:
        for name, value in list(self.__dict__.items()):
            setattr(self, name, torch.cat([value, getattr(other, name)]))


def lbfgs_state_floats(dim: int, history_size: int) -> int:
    """Floats one run of `lbfgs` holds at its peak: its curvature history (2 x history_size vectors),
    their m x m products, and about seven more vectors (iterate, gradients, direction, step)."""
    return (2 * history_size + 7) * dim + 2 * history_size * (history_size + 3)


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
    restart: Restart | None = None,
    max_active: int | None = None,
    curvature_tolerance: float = 1e-10,
    relative_curvature: bool = False,
    target: torch.Tensor | None = None,
) -> OptimResult:
    """L-BFGS for V victims at once, each run following exactly what `torch.optim.LBFGS` (no line
    search) would do over `steps` calls of `.step(closure)` on that victim alone. A step's curvature pair
    joins the history when s.y > `curvature_tolerance` (torch's fixed 1e-10 by default), or with
    `relative_curvature` when s.y > `curvature_tolerance` |s| |y|: a test that no scaling of the objective
    or of the variables changes (torch's absolute one drops every pair of an objective whose curvature is
    small in its units, and the run crawls along the steepest descent).

    A run stops early when torch's optimiser would no longer move it: its gradient falls under
    `tolerance_grad`, or its search direction is no longer a descent direction. With `restart`, a
    victim whose run ends unsatisfactorily starts again at once, in the finished run's place.
    With `max_active`, at most that many runs are in progress at a time (restarts first, then the
    victims not yet started, in order), which bounds memory and keeps the batch at a size the
    hardware handles well until the very end. With `target` (V), a run also stops once its loss is at or
    below its victim's target: where the objective cannot fall below a known floor without fitting noise.
    """
    return _BatchedLBFGS(
        objective, x0, steps=steps, lr=lr, max_iter=max_iter,
        max_eval=max_iter * 5 // 4 if max_eval is None else max_eval,
        tolerance_grad=tolerance_grad, tolerance_change=tolerance_change, history_size=history_size,
        restart=restart, max_active=max_active, curvature_tolerance=curvature_tolerance,
        relative_curvature=relative_curvature, target=target,
    ).run()


class _BatchedLBFGS:
    """One `lbfgs` call: the runs in progress (`rows`), the victims' results (`out`), and an iteration's
    phases. Each iteration evaluates every running row once; then, per row, torch's stopping rules, the
    last step's curvature pair into the history, the two-loop direction, and the move along it. Rows
    whose run ends leave the batch at once; restarts and victims not yet started take their places."""

    def __init__(self, objective: Objective, x0: torch.Tensor, *, steps: int, lr: float, max_iter: int,
                 max_eval: int, tolerance_grad: float, tolerance_change: float, history_size: int,
                 restart: Restart | None, max_active: int | None, curvature_tolerance: float,
                 relative_curvature: bool, target: torch.Tensor | None) -> None:
        self.objective, self.x0, self.restart, self.target = objective, x0, restart, target
        self.steps, self.lr, self.max_iter, self.max_eval = steps, lr, max_iter, max_eval
        self.tolerance_grad, self.tolerance_change = tolerance_grad, tolerance_change
        self.curvature_tolerance, self.relative_curvature = curvature_tolerance, relative_curvature
        self.m = history_size
        V = x0.shape[0]
        self.dev, self.dt = x0.device, x0.dtype
        self.slots = torch.arange(self.m, device=self.dev)
        # Results, indexed by victim.
        self.out = OptimResult(
            x=x0.detach().clone(), loss=torch.full((V,), float("nan"), device=self.dev, dtype=self.dt),
            evaluations=self._zeros(V, dtype=torch.long), steps=self._zeros(V, dtype=torch.long),
            converged=self._zeros(V, dtype=torch.bool), diverged=self._zeros(V, dtype=torch.bool),
            runs=self._zeros(V, dtype=torch.long), stalled=self._zeros(V, dtype=torch.long))
        self.active = V if max_active is None else max(1, min(max_active, V))
        self.rows = self._new_rows(torch.arange(self.active, device=self.dev), x0[:self.active])
        self.queued = self.active  # victims queued..V-1 have not started yet
        self.waiting: list[torch.Tensor] = []  # victims to start again before the next evaluation

    def run(self) -> OptimResult:
        while self._fill():
            f, grad = self._evaluate()
            f, grad = self._end_steps(f, grad)
            if not self.rows.victim.numel():
                continue
            r = self.rows
            first = r.n_iter == 0
            r.n_iter += 1
            r.iter_in_step += 1
            Sg, Yg = self._update_history(grad, first)
            self._move(f, grad, self._direction(grad, Sg, Yg), first)
        return self.out

    def _zeros(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.zeros(*shape, device=self.dev, dtype=self.dt if dtype is None else dtype)

    def _new_rows(self, victims: torch.Tensor, x: torch.Tensor) -> _Rows:
        n, D, m, zeros = len(victims), self.x0.shape[1], self.m, self._zeros
        return _Rows(
            victim=victims, x=x.detach().to(self.dev, self.dt).clone(), loss=zeros(n), prev_g=zeros(n, D),
            prev_loss=zeros(n), d=zeros(n, D), t=zeros(n), h_diag=torch.ones(n, device=self.dev, dtype=self.dt),
            # Curvature pairs in a ring buffer per run, steps s in W[:m] and gradient changes y in W[m:]:
            # `head` is the oldest slot, `count` how many are held; SY[i, j] = s_i . y_j and YY[i, j] = y_i . y_j
            # in history order are kept up to date as pairs arrive (SY's diagonal is 1 at empty places).
            W=zeros(n, 2 * m, D), SY=torch.eye(m, device=self.dev, dtype=self.dt).repeat(n, 1, 1),
            YY=zeros(n, m, m),
            # Last iteration's products of the pairs with g_prev and its direction's coefficients (history order).
            prev_Sg=zeros(n, m), prev_Yg=zeros(n, m), coef=zeros(n, 2 * m),
            head=zeros(n, dtype=torch.long), count=zeros(n, dtype=torch.long),
            n_iter=zeros(n, dtype=torch.long),  # iterations over all steps (torch's state['n_iter'])
            iter_in_step=zeros(n, dtype=torch.long), evals_in_step=zeros(n, dtype=torch.long),
            step=zeros(n, dtype=torch.long), evaluations=zeros(n, dtype=torch.long),
            at_step_start=torch.ones(n, dtype=torch.bool, device=self.dev),  # next evaluation opens a new .step()
            # Ended on a move: the next evaluation only reports the loss at the final point.
            closing=zeros(n, dtype=torch.bool), converged=zeros(n, dtype=torch.bool),
        )

    def _fill(self) -> bool:
        """Restarts first, then victims not yet started, into the free places; False once nothing runs."""
        if self.waiting:
            victims = torch.cat(self.waiting)
            self.waiting.clear()
            if victims.numel():
                self.rows.extend(self._new_rows(victims, self.restart.draw(len(victims))))
        room = min(self.active - len(self.rows.victim), len(self.x0) - self.queued)
        if room > 0:
            start, end = self.queued, self.queued + room
            self.rows.extend(self._new_rows(torch.arange(start, end, device=self.dev), self.x0[start:end]))
            self.queued = end
        return bool(self.rows.victim.numel())

    def _finish(self, mask: torch.Tensor, diverged: bool = False) -> torch.Tensor:
        """Record the runs in `mask` as done and drop their rows; returns ~mask to filter this step's values."""
        r, out, restart = self.rows, self.out, self.restart
        if bool(mask.any()):
            v = r.victim[mask]
            broke = torch.full_like(v, diverged, dtype=torch.bool)
            loss = torch.where(broke, float("nan"), r.loss[mask])
            stalled = ~broke & (r.evaluations[mask] <= 1)
            # Keep a victim's best run: any finite run beats a diverged one, else the lower loss wins.
            better = (out.runs[v] == 0) | (out.diverged[v] & ~broke) | (~broke & (loss < out.loss[v]))
            kept = v[better]
            out.x[kept], out.loss[kept], out.steps[kept] = r.x[mask][better], loss[better], r.step[mask][better]
            out.converged[kept], out.diverged[kept] = r.converged[mask][better], broke[better]
            out.evaluations[v] += r.evaluations[mask]
            out.runs[v] += 1
            out.stalled[v] += stalled.long()
            r.keep(~mask)
            if restart is not None:
                again = (out.runs[v] <= restart.tries) & (
                    out.diverged[v] | stalled | restart.unsatisfied(v, out.loss[v]))
                self.waiting.append(v[again])
        return ~mask

    def _evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradient of every running row; rows that diverged, or were evaluated only to report
        their final loss, finish here. Returns the values of the rows still running."""
        r = self.rows
        f, grad = self.objective(r.x, r.victim)
        f, grad = f.detach(), grad.detach()
        r.evaluations += (~r.closing).long()
        # A sum is finite only if every term is (a finite gradient whose sum overflows has diverged too).
        bad = ~(torch.isfinite(f) & torch.isfinite(grad.sum(1)))
        if bool(bad.any()):
            # Step back to the last finite point so the victim's iterate stays usable.
            r.x[bad] -= r.t[bad, None] * r.d[bad]
            keep = self._finish(bad, diverged=True)
            f, grad = f[keep], grad[keep]
        r.loss = f
        # A run that ended on a move was evaluated only to report the loss where it ended.
        keep = self._finish(r.closing)
        return f[keep], grad[keep]

    def _end_steps(self, f: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """torch's stopping rules: which rows' .step() call ends here, and which runs end with it."""
        r = self.rows
        opt_cond = grad.abs().amax(1) <= self.tolerance_grad
        if self.target is not None:
            opt_cond |= f <= self.target[r.victim]
        starting = r.at_step_start
        r.evals_in_step = torch.where(starting, 1, r.evals_in_step + 1)
        # After an in-step evaluation torch checks its stopping rules; any of them ends the .step() call.
        # The next call re-evaluates the same point (same loss and gradient), so that evaluation is skipped.
        moved = (r.d * r.t[:, None]).abs().amax(1) <= self.tolerance_change
        flat = (f - r.prev_loss).abs() < self.tolerance_change
        ends = ~starting & (opt_cond | moved | flat | (r.evals_in_step >= self.max_eval))
        r.step += (ends | (opt_cond & starting)).long()
        r.evals_in_step = torch.where(ends, 1, r.evals_in_step)
        r.iter_in_step = torch.where(ends | starting, 0, r.iter_in_step)
        # A point whose gradient is under tolerance is final: every later .step() returns at once.
        r.converged |= opt_cond
        keep = self._finish(opt_cond | (r.step >= self.steps))
        return f[keep], grad[keep]

    def _update_history(self, grad: torch.Tensor, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the last step's curvature pair where it passes the curvature test (not on a victim's very
        first iteration); returns the pairs' products with the new gradient (Sg, Yg), in history order."""
        r, m = self.rows, self.m
        s_new = r.d * r.t[:, None]
        y_new = grad - r.prev_g
        ys = (y_new * s_new).sum(1)
        # One pass over the history per iteration: its pairs' products with the new gradient, in history
        # order. The new pair's products with the others follow from last iteration's without another
        # pass (see _add_pairs).
        dots = torch.bmm(grad[:, None, :], r.W.transpose(1, 2))[:, 0]
        order = self._history_order()
        Sg, Yg = torch.gather(dots[:, :m], 1, order), torch.gather(dots[:, m:], 1, order)
        scale = s_new.norm(dim=1) * y_new.norm(dim=1) if self.relative_curvature else 1.0
        add = ~first & (ys > self.curvature_tolerance * scale)
        if bool(add.any()):
            Sg, Yg = self._add_pairs(add, s_new, y_new, ys, grad, Sg, Yg)
        r.h_diag = torch.where(first, 1.0, r.h_diag)
        return Sg, Yg

    def _history_order(self) -> torch.Tensor:
        """order[v, i] = the ring slot of row v's i-th oldest pair."""
        return (self.rows.head[:, None] + self.slots[None, :]) % self.m

    def _add_pairs(self, add: torch.Tensor, s_new: torch.Tensor, y_new: torch.Tensor, ys: torch.Tensor,
                   grad: torch.Tensor, Sg: torch.Tensor, Yg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the pair (s_new, y_new) of the rows in `add`, dropping the oldest of a full history, and
        bring SY, YY, Sg, Yg up to date: s_i.y = s_i.g - s_i.g_prev, y_i.y likewise, and s = t d with
        d = -h g_prev + [S; Y]^T coef, so no second pass over the history is needed."""
        r, m = self.rows, self.m
        s_ynew, y_ynew = Sg - r.prev_Sg, Yg - r.prev_Yg
        coef_s, coef_y = r.coef[:, None, :m], r.coef[:, None, m:]
        s_y = r.t[:, None] * (-r.h_diag[:, None] * r.prev_Yg
                              + torch.bmm(coef_s, r.SY)[:, 0] + torch.bmm(coef_y, r.YY)[:, 0])
        # A full history drops its oldest pair: everything kept in history order moves up one place.
        evict = add & (r.count == m)
        if bool(evict.any()):
            everyone = bool(evict.all())  # the usual case once histories are full
            r.SY, r.YY = _drop_oldest(r.SY, evict, everyone), _drop_oldest(r.YY, evict, everyone)
            Sg, Yg, s_y, s_ynew, y_ynew = (_drop_oldest(t, evict, everyone) for t in (Sg, Yg, s_y, s_ynew, y_ynew))
        at = torch.where(evict, m - 1, r.count)  # the new pair's place in history order
        slot = torch.where(evict, r.head, (r.head + r.count) % m)
        r.head = torch.where(evict, (r.head + 1) % m, r.head)
        r.count = r.count + (add & ~evict).long()
        yy = (y_new ** 2).sum(1)
        rows, a = add.nonzero().squeeze(1), at[add]
        r.W[rows, slot[add]], r.W[rows, m + slot[add]] = s_new[add], y_new[add]
        r.SY[rows, a, :], r.SY[rows, :, a] = s_y[add], s_ynew[add]  # s_new . y_j and s_i . y_new
        r.YY[rows, a, :], r.YY[rows, :, a] = y_ynew[add], y_ynew[add]
        r.SY[rows, a, a], r.YY[rows, a, a] = ys[add], yy[add]
        Sg[rows, a] = (s_new[add] * grad[add]).sum(1)
        Yg[rows, a] = (y_new[add] * grad[add]).sum(1)
        r.h_diag = torch.where(add, ys / yy, r.h_diag)
        return Sg, Yg

    def _direction(self, grad: torch.Tensor, Sg: torch.Tensor, Yg: torch.Tensor) -> torch.Tensor:
        """The two-loop recursion's direction -H g, with one pass over the history in the ring's slot order."""
        r = self.rows
        coefficients = _two_loop(Sg, Yg, r.SY, r.YY, r.h_diag)
        r.prev_Sg, r.prev_Yg, r.coef = Sg, Yg, coefficients
        order = self._history_order()  # the oldest pair may have moved on
        slot_order = torch.cat([order, order + self.m], dim=1)
        in_slots = torch.zeros_like(coefficients).scatter(1, slot_order, coefficients)
        return -r.h_diag[:, None] * grad + torch.bmm(in_slots[:, None, :], r.W)[:, 0]

    def _move(self, f: torch.Tensor, grad: torch.Tensor, direction: torch.Tensor, first: torch.Tensor) -> None:
        """Step along `direction` with torch's step length; a row whose direction is no longer a descent
        direction ends instead, and a row at max_iter ends its .step() call with this move."""
        r = self.rows
        r.d, r.prev_g, r.prev_loss = direction, grad, f
        t_first = torch.clamp(1.0 / grad.abs().sum(1), max=1.0) * self.lr
        r.t = torch.where(first, t_first, torch.full_like(t_first, self.lr))
        # Not a descent direction: torch breaks, and every later .step() recomputes the same direction.
        stuck = (grad * direction).sum(1) > -self.tolerance_change
        r.converged |= stuck
        r.step += stuck.long()
        self._finish(stuck)
        r.x = r.x + r.t[:, None] * r.d
        # At max_iter torch moves without evaluating and ends the call; the next call evaluates first.
        last = r.iter_in_step >= self.max_iter
        r.step += last.long()
        r.at_step_start = last
        r.closing = last & (r.step >= self.steps)


def _drop_oldest(t: torch.Tensor, evict: torch.Tensor, everyone: bool) -> torch.Tensor:
    """Rows of `t` (V x m or V x m x m, history order) in `evict` shifted up one place; the freed last
    row/column is zero until the new pair fills it."""
    moved = F.pad(t[:, 1:], (0, 1)) if t.dim() == 2 else F.pad(t[:, 1:, 1:], (0, 1, 0, 1))
    return moved if everyone else torch.where(evict.view(-1, *[1] * (t.dim() - 1)), moved, t)


def _two_loop(
    Sg: torch.Tensor, Yg: torch.Tensor, SY: torch.Tensor, YY: torch.Tensor, h_diag: torch.Tensor
) -> torch.Tensor:
    """Coefficients of the L-BFGS direction -H g = -h g + S^T c + Y^T (-h alpha), as torch's two-loop
    recursion computes it; everything in history order (oldest first).

    The recursion's two sequential loops are two triangular linear systems in the history order, with
    s_i.y_i = 1/rho_i on the diagonal of SY (1 at empty places, whose products are all zero): given the
    pairs' dot products with g (Sg, Yg) and with each other (SY, YY), they need no pass over the
    history. Returns [c, -h alpha] per victim (V x 2m).
    """
    h = h_diag[:, None]
    # First loop (newest to oldest): alpha_i = rho_i s_i.(q - sum_{j>i} alpha_j y_j), q = -g.
    # A triangular solve reads only the triangle it is told, so SY serves both loops as it is.
    alpha = torch.linalg.solve_triangular(SY, -Sg[:, :, None], upper=True)[:, :, 0]
    # r0 = h (q - Y^T alpha), so y_i . r0 = h (-y_i.g - sum_j (y_i.y_j) alpha_j).
    y_r0 = h * (-Yg - torch.bmm(YY, alpha[:, :, None])[:, :, 0])
    # Second loop (oldest to newest): c_i = alpha_i - rho_i y_i.(r0 + sum_{j<i} c_j s_j).
    ys = SY.diagonal(dim1=1, dim2=2)
    c = torch.linalg.solve_triangular(SY.transpose(1, 2), (ys * alpha - y_r0)[:, :, None], upper=False)[:, :, 0]
    return torch.cat([c, -h * alpha], dim=1)
