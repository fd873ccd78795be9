"""DP-SGD in a site's local training: per-example clipping and calibrated Gaussian noise.

Per-example gradients come from torch.func (vmap of grad), vectorised over victims and examples
(benchmarks/dpsgd_per_example.py compares it with Opacus's GradSampleModule). Opacus serves the
accounting (defenses/accounting.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from medpfl.defenses.accounting import DEFAULT_DELTA, epsilon_spent, noise_for_epsilon
from medpfl.defenses.base import Defense, Update, draw_like, site_norms
from medpfl.defenses.clip import clip_factors
from medpfl.errors import MedPFLError
from medpfl.fl.gradients import soft_cross_entropy
from medpfl.fl.local import LocalTraining


def refuse_batchnorm(model: nn.Module) -> None:
    """DP-SGD needs each example's own gradient, which BatchNorm's batch statistics entangle."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise MedPFLError("DP-SGD cannot clip per-example gradients through BatchNorm, which mixes the examples "
                          "of a batch; pass --norm group (or --norm none).")


def per_example_gradients(model: nn.Module, params: Update, images: torch.Tensor, targets: torch.Tensor) -> Update:
    """Gradient of each example's loss: params of one model, images B x C x H x W -> name -> B x shape."""
    def one(x: torch.Tensor, t: torch.Tensor) -> Update:
        return grad(lambda p: soft_cross_entropy(functional_call(model, p, (x[None],)), t[None]))(params)
    return vmap(one)(images, targets)


@dataclass
class DPSGD(Defense):
    """Clip each example's gradient to L2 norm `clip`, sum, add N(0, (noise_multiplier * clip)^2), divide by B.

    Give `noise_multiplier`, or a target `epsilon` (at `delta`) and call `calibrated()` to get the noise
    multiplier that spends it over the whole run: `steps` noisy local steps, each on a batch sampled at
    `sample_rate`. Federated training passes every site's schedule (`for_sites`), and the schedule kept is
    the worst-off site's; an attack on one update assumes this default one: 20 rounds x 5 local steps,
    batches of 16 of a site's 160 images."""

    epsilon: float | None = None
    noise_multiplier: float | None = None
    clip: float = 1.0
    delta: float = DEFAULT_DELTA
    accountant: str = "rdp"
    sample_rate: float = 0.1
    steps: int = 100
    name = "dpsgd"
    stage = "local"

    def calibrated(self, sample_rate: float | None = None, steps: int | None = None) -> DPSGD:
        """This defense with the run's schedule and, for a target epsilon, the noise multiplier that spends it."""
        schedule = replace(self, sample_rate=sample_rate or self.sample_rate, steps=steps or self.steps)
        if self.epsilon is None:
            return schedule
        return replace(schedule, noise_multiplier=noise_for_epsilon(self.epsilon, schedule.sample_rate,
                                                                    schedule.steps, self.delta, self.accountant))

    def for_sites(self, schedules: Sequence[tuple[float, int]]) -> DPSGD:
        """Calibrated so that every site, each with its own (sample rate, steps), spends at most the target:
        the noise is the largest any site needs, and the schedule kept is that worst-off site's."""
        distinct = sorted(set(schedules))
        if self.epsilon is None:  # a given noise multiplier: keep the schedule that spends the most
            return max((replace(self, sample_rate=q, steps=t) for q, t in distinct), key=DPSGD.epsilon_spent)
        return max((self.calibrated(q, t) for q, t in distinct), key=lambda d: d.noise_multiplier)

    def epsilon_spent(self) -> float:
        """Epsilon this noise multiplier spends over the schedule (Opacus's accountant)."""
        return epsilon_spent(self._noise(), self.sample_rate, self.steps, self.delta, self.accountant)

    def at_site(self, site: int, round_index: int = 0) -> DPSGD:
        """The DP-SGD site `site` runs in a round: this one everywhere (a privacy audit's canaries differ)."""
        return self

    def _noise(self) -> float:
        if self.noise_multiplier is None:
            raise MedPFLError("dpsgd needs noise=... or epsilon=... calibrated to the run's schedule.")
        return self.noise_multiplier

    def private_gradient(self, per_example: Update, generator: torch.Generator, batch_size: int | None = None) -> Update:
        """The noisy mean of clipped per-example gradients (name -> B x shape in, name -> shape out)."""
        factors = clip_factors(site_norms(per_example), self.clip)
        B = batch_size or next(iter(per_example.values())).shape[0]  # Poisson sampling: the expected size
        out = {}
        for name, g in per_example.items():
            summed = torch.einsum("b,b...->...", factors, g)
            out[name] = (summed + self._noise() * self.clip * draw_like(summed, generator, "normal")) / B
        return out

    def site_gradients(self, model: nn.Module, params: Update, images: torch.Tensor, labels: torch.Tensor,
                       num_classes: int, generator: torch.Generator) -> Update:
        """Each site's DP-SGD update: params S x ..., images S x B x C x H x W, labels S x B -> S x ..."""
        refuse_batchnorm(model)
        targets = F.one_hot(labels, num_classes).to(images.dtype)
        with torch.no_grad():
            grads = vmap(lambda p, x, t: per_example_gradients(model, p, x, t))(params, images, targets)
            S = images.shape[0]
            rows = [self.private_gradient({n: g[s] for n, g in grads.items()}, generator) for s in range(S)]
        return {n: torch.stack([r[n] for r in rows]) for n in grads}


def local_sample_rate(n_images: int, training: LocalTraining) -> float:
    """The rate at which DP-SGD samples each of a site's images into a local step: batch / images (1 for fedsgd)."""
    if training.protocol == "fedsgd":
        return 1.0
    return min(1.0, training.batch_size / n_images)


def dp_schedules(n_images: Sequence[int], training: LocalTraining, rounds: int) -> list[tuple[float, int]]:
    """Each site's DP-SGD schedule over the run, (sample rate, noisy steps): its own image count sets both,
    so a small site, sampled at a higher rate, spends more epsilon than a large one with the same noise."""
    return [(local_sample_rate(n, training), rounds * training.steps(n)) for n in n_images]


def poisson_batch(n_images: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of one Poisson-sampled batch: each image independently with probability `rate` (maybe none),
    as Opacus's UniformWithReplacementSampler draws them and as the accountant assumes."""
    if rate >= 1.0:
        return torch.arange(n_images, device=generator.device)
    keep = torch.rand(n_images, generator=generator, device=generator.device) < rate
    return keep.nonzero().flatten()


def dp_local_update(model: nn.Module, params: Update, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    training: LocalTraining, dp: DPSGD, generator: torch.Generator) -> Update:
    """fl.local.local_update with every step's gradient replaced by DP-SGD's (clipped per example, noised).

    fedsgd: one private gradient of all the site's images; fedavg: `training.steps(n)` steps, each on a
    batch Poisson-sampled afresh at rate batch / n (so a batch's size varies, and an image may sit out a
    step or appear in consecutive ones), its noisy sum divided by the expected batch size, heavy-ball
    momentum, the weight change returned. This is the sampling Opacus's RDP and PRV accountants assume;
    fixed shuffled batches would void their amplification by sampling. `generator` draws both the
    batches and the noise: in a real deployment it is the site's secret randomness."""
    refuse_batchnorm(model)
    targets = F.one_hot(labels, num_classes).to(images.dtype)
    n = images.shape[0]

    def step(p: Update, batch: torch.Tensor, expected: float) -> Update:
        if len(batch) == 0:  # an empty draw still releases noise, as Opacus does
            empty = {name: torch.zeros((0, *w.shape), dtype=w.dtype, device=w.device) for name, w in p.items()}
            return dp.private_gradient(empty, generator, batch_size=expected)
        return dp.private_gradient(per_example_gradients(model, p, images[batch], targets[batch]), generator,
                                   batch_size=expected)

    with torch.no_grad():
        if training.protocol == "fedsgd":
            return step(params, torch.arange(n, device=images.device), n)
        rate = local_sample_rate(n, training)
        weights = dict(params)
        velocity = {name: torch.zeros_like(p) for name, p in params.items()}
        for _ in range(training.steps(n)):
            for name, g in step(weights, poisson_batch(n, rate, generator), rate * n).items():
                velocity[name] = training.momentum * velocity[name] + g
                weights[name] = weights[name] - training.lr * velocity[name]
        return {name: weights[name] - params[name] for name in params}
