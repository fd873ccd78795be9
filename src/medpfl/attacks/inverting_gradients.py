"""Inverting Gradients (Geiping et al. 2020, "GradInv"), for many victims and restarts at once.

The attack matches the direction, not the size, of the observed update: it minimises one minus the
cosine similarity of the candidate's and the observed parameter gradients (on the `top_layers`
tensors with the largest observed norm) plus a total-variation prior, with Adam on the sign of the
image gradient, a step decay at 3/8, 5/8 and 7/8 of the steps, images boxed to [0,1], several random
restarts of which the one with the lowest attacker objective wins, and a final 3 x 3 median filter.

Restarts are treated as more victims: the V x R candidates run in one vectorised optimisation.
Adam is elementwise, so one Adam over the whole candidate tensor is exactly one Adam per candidate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from medpfl.attacks.base import SettingsAttack
from medpfl.attacks.labels import recover_labels
from medpfl.attacks.objectives import cosine_distance, top_layer_weights, total_variation
from medpfl.attacks.optim import Checkpoint
from medpfl.attacks.registry import AttackEntry, register
from medpfl.attacks.threat import ObservedUpdate, Reconstruction, ServerPayload, ThreatModel
from medpfl.errors import MedPFLError
from medpfl.fl.gradients import functional_model, parameter_gradient


@dataclass
class InvertingGradientsSettings:
    """Settings of Inverting Gradients; defaults are the paper's (untrained ResNet-18 on ImageNet)."""

    steps: int = 24000
    restarts: int = 8
    lr: float = 0.1
    signed: bool = True  # Adam is fed the sign of the image gradient, as in the paper
    decay_at: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)  # fractions of `steps` where the step size decays
    decay_factor: float = 0.1
    tv_weight: float = 1e-6  # the paper: 1e-6 on untrained, 1e-1 on trained networks
    top_layers: int | None = 10  # cosine on the tensors with the largest observed-gradient norm; None = all
    boxed: bool = True  # clamp images to [0,1] after every step
    # The paper draws N(0,1) in normalised coordinates; our images are raw [0,1] pixels, so "gaussian"
    # draws N(0.5, 0.25^2) (about a dataset's mean and std) clamped to [0,1]; "uniform" draws U(0,1).
    init: str = "gaussian"
    median_filter: bool = True  # a final 3 x 3 median filter on the chosen images
    candidates_per_batch: int | None = None  # cap on candidates optimised together (memory); None = all
    # GradInversion's BatchNorm-statistics prior (Yin et al. 2021), its weight (0: none, the paper's): the
    # running statistics the server holds say what a batch's features look like at each BatchNorm layer. For
    # models run with BatchNorm on those statistics (bn_mode eval).
    bn_prior: float = 0.0


def batchnorm_statistics_distance(fmodel: nn.Module, params: dict[str, torch.Tensor],
                                  images: torch.Tensor) -> torch.Tensor:
    """GradInversion's prior on a batch of candidate images: over the BatchNorm layers of `fmodel` (in eval
    mode), the L2 distance of the per-channel mean of the features entering the layer from its running mean,
    plus that of their (biased) variance from its running variance, summed."""
    terms: list[torch.Tensor] = []

    def compare(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        features = inputs[0]
        var, mean = torch.var_mean(features, dim=[0, *range(2, features.dim())], correction=0)
        terms.append((mean - module.running_mean).norm() + (var - module.running_var).norm())

    hooks = [m.register_forward_hook(compare) for m in _running_batchnorms(fmodel)]
    try:
        functional_call(fmodel, params, (images,))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(terms)


def _running_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of `model` that normalise with running statistics (eval mode)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None and not m.training]


def median_filter(images: torch.Tensor, size: int = 3) -> torch.Tensor:
    """size x size median filter over the last two dims of ... x H x W images, reflect-padded."""
    shape = images.shape
    x = images.reshape(-1, 1, *shape[-2:])
    pad = size // 2
    # Reflect padding needs more than `pad` pixels per side; tiny images fall back to replicate.
    mode = "reflect" if min(shape[-2:]) > pad else "replicate"
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    patches = x.unfold(2, size, 1).unfold(3, size, 1)  # N x 1 x H x W x size x size
    return patches.flatten(-2).median(-1).values.reshape(shape)


class InvertingGradients(SettingsAttack):
    """Reconstruct each victim's batch by signed Adam on cosine gradient distance plus TV, with restarts."""

    name = "invgrad"
    settings_class = InvertingGradientsSettings
    takes_checkpoints = True  # the paper's 24,000 steps take hours on a CPU

    def initial_images(self, n: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Starting points for n images of shape C x H x W, in [0,1]."""
        if self.settings.init == "gaussian":
            return (0.5 + 0.25 * torch.randn(n, *shape, generator=generator)).clamp(0, 1)
        if self.settings.init == "uniform":
            return torch.rand(n, *shape, generator=generator)
        raise ValueError(f"unknown init {self.settings.init!r}; use 'gaussian' or 'uniform'")

    def step_size(self, step: int) -> float:
        """Adam's learning rate at 0-based `step`: lr decayed by decay_factor at each milestone passed."""
        s = self.settings
        passed = sum(step >= int(s.steps * f) for f in s.decay_at)
        return s.lr * s.decay_factor**passed

    def simulated_update(self, payload: ServerPayload, fmodel: torch.nn.Module) -> Callable[..., dict[str, torch.Tensor]]:
        """What the attacker computes from candidate images to compare with the observed update:
        (params, images, targets) -> the gradient of one training step, differentiable in the images."""
        return lambda params, images, targets: parameter_gradient(fmodel, params, images, targets)

    def candidate_labels(self, labels: torch.Tensor, restarts: int, payload: ServerPayload,
                         generator: torch.Generator) -> torch.Tensor:
        """The labels each restart gives its candidate images, in order: V x R x B. A gradient is the
        same for any order of a batch, so every restart takes the labels as they are."""
        return labels[:, None].expand(-1, restarts, -1)

    def reconstruct(self, payload: ServerPayload, update: ObservedUpdate, generator: torch.Generator,
                    checkpoint: Checkpoint | None = None) -> Reconstruction:
        """Attack every victim in `update` at once; returns images V x B x C x H x W in [0,1].

        With a `checkpoint`, the optimisation saves its state there now and then and continues from it
        (to the same result) when a crashed run is started again."""
        s = self.settings
        if s.restarts < 1 or s.steps < 0:
            raise ValueError(f"need restarts >= 1 and steps >= 0, got {s.restarts} and {s.steps}")
        V, R, B, K = payload.n_victims, s.restarts, update.batch_size, payload.num_classes
        shape = payload.image_shape
        some = next(iter(payload.params.values()))
        dev, dt = some.device, some.dtype

        start = time.perf_counter()
        fmodel = functional_model(payload.model, payload.bn_mode)
        if s.bn_prior and not _running_batchnorms(fmodel):
            raise MedPFLError(f"Setting bn_prior={s.bn_prior} needs a model with BatchNorm run on its running "
                              f"statistics (--bn-mode eval); {type(payload.model).__name__} in bn_mode "
                              f"'{payload.bn_mode}' has none (the LeNets have no BatchNorm).")
        labels = recover_labels(update, payload).to(dev)
        weights = top_layer_weights(update.gradients, s.top_layers)
        # Tensors no victim selects add exactly zero to the cosine; leaving them out of the sums
        # saves passes over millions of entries per step (most of the time on a ResNet-18).
        used = [n for n, w in weights.items() if bool((w != 0).any())]
        weights = {n: weights[n] for n in used}
        observed_used = {n: update.gradients[n] for n in used}
        # Candidate r of victim v starts from draw v * R + r, whatever the chunking.
        x0 = self.initial_images(V * R * B, shape, generator).reshape(V, R, B, *shape).to(dev, dt)
        candidate_labels = self.candidate_labels(labels, R, payload, generator).to(dev)  # V x R x B
        targets = F.one_hot(candidate_labels, K).to(dev, dt)

        simulate = self.simulated_update(payload, fmodel)

        def victim_loss(images, params, observed, layer_weights, victim_targets):
            candidate = simulate(params, images, victim_targets)
            loss = cosine_distance(candidate, observed, layer_weights) + s.tv_weight * total_variation(images)
            if s.bn_prior:
                loss = loss + s.bn_prior * batchnorm_statistics_distance(fmodel, params, images)
            return loss

        # Inner map: restarts share their victim's weights (unbatched, so convolutions fold them
        # into the batch); outer map: victims.
        per_restart = vmap(grad_and_value(victim_loss), in_dims=(0, None, None, None, 0))
        per_candidate = vmap(per_restart)

        images = torch.empty_like(x0)
        objective = torch.full((V, R), math.inf, device=dev, dtype=dt)
        steps_run = torch.zeros(V, R, dtype=torch.long)
        # A saved state holds the finished chunks' results and the optimiser of the chunk that was running.
        saved = checkpoint.load() if checkpoint is not None else None
        first_chunk, seconds_before = 0, 0.0
        if saved is not None:
            images.copy_(saved["images"])
            objective.copy_(saved["objective"])
            steps_run.copy_(saved["steps_run"])
            first_chunk, seconds_before = saved["chunk"], saved["seconds"]
        for index, (victims, restarts) in enumerate(_chunks(V, R, s.candidates_per_batch)):
            if index < first_chunk:
                continue
            # Whole-range picks are views; subsets copy only their own victims' weights.
            pick = (lambda t: t) if len(victims) == V else (lambda t: t[victims])
            args = (
                {n: pick(p) for n, p in payload.params.items()},
                {n: pick(g) for n, g in observed_used.items()},
                {n: pick(w) for n, w in weights.items()},
                pick(targets)[:, restarts],
            )

            def save(progress: Callable[[], dict[str, Any]], index: int = index) -> None:
                if checkpoint.due():
                    checkpoint.save({"images": images, "objective": objective, "steps_run": steps_run, "chunk": index,
                                     "seconds": seconds_before + time.perf_counter() - start, "progress": progress()})

            resume = saved["progress"] if saved is not None and index == first_chunk else None
            x, loss, ran = self._optimise(per_candidate, x0[victims][:, restarts], args, resume,
                                          save if checkpoint is not None else None)
            images[victims[:, None], restarts] = x
            objective[victims[:, None], restarts] = loss
            steps_run[victims[:, None], restarts] = ran
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

        diverged_candidates = ~torch.isfinite(objective)
        best = objective.nan_to_num(math.inf).argmin(1)  # the attacker's own score, never the ground truth
        rows = torch.arange(V, device=dev)
        chosen = images[rows, best]
        if s.median_filter:
            chosen = median_filter(chosen)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = seconds_before + time.perf_counter() - start

        diverged = diverged_candidates.all(1)
        # A diverged victim's pixels may be NaN; give a defined image in [0,1] all the same.
        chosen = chosen.nan_to_num(0.5, 0.5, 0.5).clamp(0, 1)
        # Each step costs one gradient evaluation, and scoring the final iterate one more.
        evaluations = (steps_run + 1).sum(1)
        return Reconstruction(
            images=chosen.detach(),
            labels=candidate_labels[rows, best],
            objective=objective[rows, best].detach(),
            evaluations=evaluations,
            diverged=diverged.to(dev),
            seconds=seconds,
            extra={"candidate_objective": objective.detach(), "chosen_restart": best,
                   "diverged_candidates": diverged_candidates},
        )

    def _optimise(self, per_candidate, x0: torch.Tensor, args: tuple, resume: dict[str, Any] | None = None,
                  save: Callable[[Callable[[], dict[str, Any]]], None] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Signed Adam from x0 (v x r x B x C x H x W), or from a saved state `resume`; offers its state to
        `save` before every step. Returns final images, final objective (v x r) and steps run."""
        s = self.settings
        x = x0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=s.lr)
        dead = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        ran = torch.zeros(x.shape[:2], dtype=torch.long)
        first = 0
        if resume is not None:
            with torch.no_grad():
                x.copy_(resume["x"])
            optimizer.load_state_dict(resume["adam"])
            dead.copy_(resume["dead"])
            ran.copy_(resume["ran"])
            first = resume["step"]
        for step in range(first, s.steps):
            if save is not None:
                save(lambda: {"step": step, "x": x.detach(), "adam": optimizer.state_dict(), "dead": dead, "ran": ran})
            gradient, loss = per_candidate(x.detach(), *args)
            dead |= ~torch.isfinite(loss) | ~torch.isfinite(gradient).flatten(2).all(2)
            ran += (~dead).cpu().long()
            if bool(dead.all()):
                break
            direction = gradient.sign() if s.signed else gradient
            # A diverged candidate stops moving: its zero gradient keeps NaN out of Adam's state.
            x.grad = torch.where(dead.view(*dead.shape, 1, 1, 1, 1), torch.zeros_like(direction), direction)
            for group in optimizer.param_groups:
                group["lr"] = self.step_size(step)
            optimizer.step()
            if s.boxed:
                with torch.no_grad():
                    x.clamp_(0, 1)
        # Score the images actually returned, after the last step; only the value is needed.
        with torch.no_grad():
            _, loss = per_candidate(x.detach(), *args)
        loss = torch.where(dead, torch.full_like(loss, math.nan), loss)
        return x.detach(), loss.detach(), ran


def _chunks(V: int, R: int, per_batch: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rectangles (victims, restarts) of at most `per_batch` candidates that tile the V x R grid."""
    if per_batch is not None and per_batch < 1:
        raise ValueError(f"candidates_per_batch must be at least 1, got {per_batch}")
    if per_batch is None or per_batch >= V * R:
        return [(torch.arange(V), torch.arange(R))]
    if per_batch >= R:  # whole victims, all their restarts together
        n = per_batch // R
        return [(torch.arange(v, min(v + n, V)), torch.arange(R)) for v in range(0, V, n)]
    return [(torch.tensor([v]), torch.arange(r, min(r + per_batch, R))) for v in range(V) for r in range(0, R, per_batch)]


invgrad = InvertingGradients  # invgrad(**settings): the paper's settings, overridden by `settings`

# As the paper ran it: handed the true labels, the network in eval mode (BatchNorm on its running statistics).
register(AttackEntry(
    "invgrad", InvertingGradients, "Inverting Gradients: cosine distance, TV, signed Adam, restarts "
    "(Geiping et al. 2020)", "Inverting Gradients", "adjusts an image until its update points in the same "
    "direction as the observed one, favouring natural-looking images (Geiping et al. 2020)",
    default_model="resnet18", bn_mode="eval", threat=ThreatModel(knows_labels=True),
    paper_procedure={"steps": 24_000, "restarts": 8}))
