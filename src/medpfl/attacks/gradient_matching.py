"""DLG, iDLG and CPL: match the observed gradient with L-BFGS, for many victims at once.

The three attacks share one optimisation and differ in what they start from and how they get the
labels (SEED.md): DLG optimises a soft label beside the image from Gaussian noise; iDLG reads the
label off the last layer's gradient; CPL does the same and starts from a tiled random pattern.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from medpfl.attacks.base import SettingsAttack
from medpfl.attacks.defense_aware import noise_variance, noisy_update, signal_weights, sparse_update
from medpfl.attacks.labels import last_layer, recover_labels
from medpfl.attacks.lenet_matching import LeNetGradientDistance, per_entry
from medpfl.attacks.objectives import cosine_distance, l2_distance, total_variation
from medpfl.attacks.optim import Restart, lbfgs, lbfgs_state_floats
from medpfl.attacks.registry import AttackEntry, register
from medpfl.attacks.threat import ObservedUpdate, Reconstruction, ServerPayload
from medpfl.errors import MedPFLError
from medpfl.fl.gradients import functional_model, parameter_gradient
from medpfl.models.lenet import LeNet


@dataclass
class GradientMatchingSettings:
    """Settings of the L-BFGS gradient-matching attacks; defaults are the paper's."""

    steps: int = 300  # calls of L-BFGS .step(), each up to max_iter iterations
    lr: float = 1.0
    max_iter: int = 20
    history_size: int = 100
    # Stopping and curvature tolerances. The gradient and loss of the (normalised) distance scale with the
    # update, so these are the paper's absolute ones (1e-7, 1e-9 and torch's 1e-10) on an update of squared
    # norm 1e3, typical of an untrained LeNet on 32 px images (measured 1 to 1,500 on the embedded set).
    tolerance_grad: float = 1e-10
    tolerance_change: float = 1e-12
    # A curvature pair joins L-BFGS's history when s.y > curvature_tolerance |s| |y| (with `normalize`; the
    # paper's procedure: s.y > curvature_tolerance, torch's test). Relative, because the relative distance
    # is small in pixel units where the update is large: an absolute 1e-13 dropped every pair of CPL's
    # LeNet (update norm ~180), whose runs then crawled for minutes to nothing.
    curvature_tolerance: float = 1e-10
    init: str = "gaussian"  # "gaussian" N(0,1) or "pattern" (CPL: a random patch tiled 2 x 2)
    labels: str = "recover"  # "recover" from the last layer, or "optimize" a soft label (DLG)
    # Divide the distance by the observed update's squared norm, so that the tolerances above are relative
    # to the victim's own update: a confident model's update can be 1e-12 of another's, and the paper's
    # absolute tolerances then end every run at its first evaluation. False: the paper's objective.
    normalize: bool = True
    # Where the site's gradient w.r.t. its logits comes from. "observed": read off the update (for one
    # image, the classifier's bias gradient is exactly that vector), so the candidate's gradient is that
    # vector's backward pass: exact however saturated the softmax, and consistent with what the site's
    # float32 arithmetic produced. "candidate": from the candidate's softmax (the paper; always so for
    # batches, classifiers without a bias, and optimised labels).
    logit_gradient: str = "observed"
    # Fresh starts for victims whose run diverged, ended at its first evaluation, or ended with a relative
    # gradient distance (distance / observed squared norm) above `restart_above`. The attacker judges by its
    # own objective alone: with the relative tolerances, reconstructions (SSIM >= 0.99) end below 2e-9 on
    # the embedded set, six classes and CT vs MR, untrained and pretrained models.
    # A restart costs only the victims that need it and runs in place, so the budget is generous.
    restarts: int = 7
    restart_above: float = 1e-4
    # What is matched. "l2": the squared distance (the papers'); "cosine": one minus the cosine similarity,
    # blind to the update's scale (clipping, DP-SGD's per-example clipping).
    distance: str = "l2"
    # "all" entries of the update, or only those the "observed" update holds non-zero: a sparsified update
    # says nothing about the entries it dropped, and matching them to zero pulls the candidate away.
    support: str = "all"
    tv_weight: float = 0.0  # weight of a total-variation prior on the candidate images (0: none, the papers')
    # Read the noise the defense puts into the update off the protocol (defense_aware.noise_variance) and
    # weigh each layer by the share of it that is signal (defense_aware.signal_weights); a run stops where
    # its distance reaches the one the true image would have (going lower fits the noise), and a victim is
    # restarted only when its best run ends `restart_above` beyond that floor.
    noise_floor: bool = False
    # Victims optimised at once; the others start as running ones finish. None: all of them on a GPU,
    # and on a CPU as many as keep the running victims' layer outputs within ~8 MB, so that they stay
    # in cache (CPL's LeNet, 64 images end to end, 11 / 16 / 32 / 64 at a time: 1.73 / 1.71 / 1.69 / 2.06 ms
    # per victim-evaluation).
    max_active: int | None = None


# The papers' procedure: a single start on the plain distance, whose iterates are torch.optim.LBFGS's
# (`--restarts 0 --set normalize=false --set logit_gradient=candidate --set tolerance_grad=1e-7
# --set tolerance_change=1e-9 --set curvature_tolerance=1e-10`).
PAPER_PROCEDURE = {"normalize": False, "logit_gradient": "candidate", "restarts": 0, "tolerance_grad": 1e-7,
                   "tolerance_change": 1e-9, "curvature_tolerance": 1e-10}


class GradientMatchingAttack(SettingsAttack):
    """Reconstruct each victim's batch by L-BFGS on the squared L2 gradient distance."""

    name = "gradient-matching"
    settings_class = GradientMatchingSettings
    takes_checkpoints = False  # a batch of victims ends within minutes; results are written after it

    def initial_images(self, n: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Starting points for n images of shape C x H x W."""
        if self.settings.init == "gaussian":
            return torch.randn(n, *shape, generator=generator)
        if self.settings.init == "pattern":
            c, h, w = shape
            patch = torch.rand(n, c, (h + 1) // 2, (w + 1) // 2, generator=generator)
            return patch.repeat(1, 1, 2, 2)[:, :, :h, :w].contiguous()
        raise ValueError(f"unknown init {self.settings.init!r}; use 'gaussian' or 'pattern'")

    def reconstruct(self, payload: ServerPayload, update: ObservedUpdate, generator: torch.Generator) -> Reconstruction:
        """Attack every victim in `update` at once; returns images V x B x C x H x W in [0,1]."""
        return self.reconstruct_rounds([payload], [update], generator)

    def reconstruct_rounds(self, payloads: list[ServerPayload], updates: list[ObservedUpdate],
                           generator: torch.Generator) -> Reconstruction:
        """Attack every victim from its updates of R rounds: payloads[r] and updates[r] hold round r's weights
        and observed updates of the same V victims, behind the same images in every round (FedSGD on a fixed
        batch). One candidate per victim is matched in all R rounds at once, its distance theirs together, so
        that the defense's independent draws of each round average out. One round: the single-update attack."""
        s = self.settings
        R, V = len(payloads), payloads[0].n_victims
        payload, update = stack_rounds(payloads, updates)  # R V entries, round-major: entry r V + v
        B, K = update.batch_size, payload.num_classes
        shape = payload.image_shape
        some = next(iter(payload.params.values()))
        dev, dt = some.device, some.dtype
        n_pixels = B * shape[0] * shape[1] * shape[2]
        optimize_labels = s.labels == "optimize" and update.labels is None

        def victims_total(per_round: torch.Tensor) -> torch.Tensor:  # R V -> V
            return per_round.reshape(R, V).sum(0)

        start = time.perf_counter()
        scale = sum((g.flatten(1) ** 2).sum(1) for g in update.gradients.values()).clamp_min(1e-30)
        fixed_targets = None
        if not optimize_labels:
            # Read off the rounds' mean update: the bias gradient's sign is the same in every round, the noise not.
            fixed_targets = F.one_hot(recover_labels(mean_over_rounds(updates), payloads[0]), K).to(dev, dt)
        logit_gradient = None
        if s.logit_gradient not in ("observed", "candidate"):
            raise MedPFLError(f"Setting logit_gradient={s.logit_gradient!r} is unknown; use 'observed' or 'candidate'.")
        if s.logit_gradient == "observed" and not optimize_labels:
            logit_gradient = observed_logit_gradient(update, payload)
        if s.distance not in ("l2", "cosine") or s.support not in ("all", "observed"):
            raise MedPFLError(f"Settings distance={s.distance!r}, support={s.support!r}: use distance 'l2' or "
                              "'cosine' and support 'all' or 'observed'.")
        support = None
        if s.support == "observed":
            support = {n: (g != 0).to(dt) for n, g in update.gradients.items()}
        floor = torch.zeros(V, device=dev, dtype=dt)
        if s.noise_floor:
            # Each layer weighted by the share of it that is signal; the distance the true images would have
            # is that of the weighted noise (relative to the weighted update for the cosine).
            variance = noise_variance(payload, update)
            weights = signal_weights(update, variance)
            support = {n: per_entry(weights[n].sqrt(), g) * (torch.ones_like(g) if support is None else support[n])
                       for n, g in update.gradients.items()}
            noise = sum(weights[n] * variance[n] * (k != 0).flatten(1).sum(1) for n, k in support.items())
            if s.distance == "l2":  # the rounds' squared distances add up, as their noise does
                floor = expected_distance_at_truth(victims_total(noise) / victims_total(scale), "l2")
            else:  # the mean of the rounds' cosine distances
                signal = sum((weights[n] * (g.flatten(1) ** 2).sum(1)) for n, g in update.gradients.items())
                floor = victims_total(expected_distance_at_truth(noise / signal.clamp_min(1e-30), "cosine")) / R
        # The cosine is scale-free already (its rounds are averaged); the L2 distance is made relative to the
        # update's size (its rounds' squared distances summed, over their updates' summed squared norms).
        relative_l2 = s.normalize and s.distance == "l2"
        total_scale = victims_total(scale)
        # Each round's distance undivided: the victim's rounds are summed first, then divided (_over_rounds).
        targets = None if fixed_targets is None else fixed_targets.repeat(R, 1, 1)
        objective = matching_objective(payload, update, targets, B, shape, logit_gradient, support=support,
                                        distance=s.distance)
        divisor = None
        if relative_l2:
            divisor = total_scale
        elif s.distance == "cosine":
            divisor = torch.full((V,), float(R), device=dev, dtype=dt)
        objective = _over_rounds(objective, R, V, divisor)
        if s.tv_weight:
            objective = _with_tv_prior(objective, s.tv_weight, B, shape)

        def draw(n: int) -> torch.Tensor:
            x = self.initial_images(n * B, shape, generator).reshape(n, n_pixels)
            if optimize_labels:
                x = torch.cat([x, torch.randn(n, B * K, generator=generator)], dim=1)
            return x.to(dev, dt)

        # The attacker judges a run by its own objective alone, relative to the observed gradient's size.
        relative = ((lambda victims, loss: loss) if s.normalize or s.distance == "cosine"
                    else (lambda victims, loss: loss / total_scale[victims]))
        restart = Restart(tries=s.restarts, draw=draw, unsatisfied=lambda victims, loss: ~(
            relative(victims, loss) <= floor[victims] + s.restart_above))
        max_active = s.max_active
        if max_active is None and dev.type == "cpu":
            max_active = max(1, _CPU_ACTIVATION_BUDGET // (R * _activation_floats(payload.model, B, shape, dev, dt)))
        x0 = draw(V)
        state_bytes = lbfgs_state_floats(x0.shape[1], s.history_size) * x0.element_size()
        max_active = _within_free_memory(max_active, state_bytes, dev)
        result = lbfgs(objective, x0, steps=s.steps, lr=s.lr, max_iter=s.max_iter,
                       history_size=s.history_size, tolerance_grad=s.tolerance_grad,
                       tolerance_change=s.tolerance_change, restart=restart, max_active=max_active,
                       curvature_tolerance=s.curvature_tolerance, relative_curvature=s.normalize,
                       target=(floor if relative_l2 or s.distance == "cosine" else floor * total_scale)
                       if s.noise_floor else None)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start

        # A victim whose every run diverged may hold NaN pixels; it gets a defined image in [0,1] all the same.
        images = result.x[:, :n_pixels].reshape(V, B, *shape).nan_to_num(0.5, 0.5, 0.5).clamp(0, 1)
        if optimize_labels:
            labels = result.x[:, n_pixels:].reshape(V, B, K).argmax(-1)
        else:
            labels = fixed_targets.argmax(-1)
        # The objective reported is always the relative one, comparable across victims and settings.
        objective = relative(torch.arange(V, device=dev), result.loss)
        return Reconstruction(images=images.detach(), labels=labels, objective=objective,
                              evaluations=result.evaluations, diverged=result.diverged, seconds=seconds,
                              extra={"runs": result.runs, "stalled_runs": result.stalled, "noise_floor": floor,
                                     "rounds": R})


def stack_rounds(payloads: list[ServerPayload], updates: list[ObservedUpdate]
                 ) -> tuple[ServerPayload, ObservedUpdate]:
    """R rounds of the same V victims as one payload and update of R V entries, round-major (entry r V + v)."""
    if len(payloads) != len(updates) or not payloads or len({p.n_victims for p in payloads}) != 1 or len(
            {u.batch_size for u in updates}) != 1:
        raise ValueError("stack_rounds takes one payload and one update per round, each of the same victims and "
                         "batch size")
    if len(payloads) == 1:
        return payloads[0], updates[0]
    params = {n: torch.cat([p.params[n] for p in payloads]) for n in payloads[0].params}
    gradients = {n: torch.cat([u.gradients[n] for u in updates]) for n in updates[0].gradients}
    labels = None if updates[0].labels is None else torch.cat([updates[0].labels] * len(updates))
    return replace(payloads[0], params=params), ObservedUpdate(gradients, updates[0].batch_size, labels)


def mean_over_rounds(updates: list[ObservedUpdate]) -> ObservedUpdate:
    """Each victim's update averaged over its rounds (the first round's, granted labels kept)."""
    if len(updates) == 1:
        return updates[0]
    return replace(updates[0], gradients={n: torch.stack([u.gradients[n] for u in updates]).mean(0)
                                          for n in updates[0].gradients})


def _over_rounds(objective, rounds: int, n_victims: int, divisor: torch.Tensor | None):
    """An objective of V victims from `objective` of their R rounds (round-major entries): each victim's
    candidate is evaluated in every one of its rounds, the losses and gradients summed, then divided by
    the victim's `divisor` (V; None: not divided)."""
    def summed(z: torch.Tensor, victims: torch.Tensor):
        loss, gradient = objective(z.repeat(rounds, 1), torch.cat([victims + r * n_victims for r in range(rounds)]))
        if rounds > 1:
            loss, gradient = loss.reshape(rounds, -1).sum(0), gradient.reshape(rounds, *z.shape).sum(0)
        if divisor is not None:
            loss, gradient = loss / divisor[victims], gradient / divisor[victims][:, None]
        return loss, gradient

    return summed


_CPU_ACTIVATION_BUDGET = 2**21  # floats (8 MB in float32) of layer outputs of all running victims


def _free_memory(device: torch.device) -> int | None:
    """Bytes the process can still allocate on `device` (None where that is not known)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return None
    return None


def _within_free_memory(max_active: int | None, bytes_per_victim: int, device: torch.device) -> int | None:
    """Cap the victims optimised at once so that their L-BFGS state takes at most half the free memory."""
    free = _free_memory(device)
    if free is None:
        return max_active
    fits = free // 2 // bytes_per_victim
    if fits < 1:
        raise MedPFLError(
            f"One victim's L-BFGS state needs {bytes_per_victim / 2**30:,.1f} GiB but only {free / 2**30:,.1f} GiB of "
            f"{device} memory is free; lower the attack's history_size (--set history_size=N) or --image-size.")
    return fits if max_active is None else min(max_active, fits)


def _activation_floats(model: nn.Module, batch: int, shape: tuple[int, int, int], device, dtype) -> int:
    """Floats the convolution and linear layers output for one victim's batch."""
    clone = copy.deepcopy(model).eval()
    sizes: list[int] = []
    for module in clone.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(lambda _module, _inputs, out: sizes.append(out.numel()))
    with torch.no_grad():
        clone(torch.zeros(batch, *shape, device=device, dtype=dtype))
    return sum(sizes)


def expected_distance_at_truth(noise_share: torch.Tensor, distance: str) -> torch.Tensor:
    """The relative distance of the true images' gradient g from an observed o = g + noise whose expected
    squared norm is `noise_share` |o|^2: that share itself for L2, and for the cosine (noise uncorrelated
    with g, so |g|^2 = |o|^2 - |noise|^2) 1 - |g| / |o|."""
    share = noise_share.clamp(0, 1)
    return share if distance == "l2" else 1 - (1 - share).sqrt()


def observed_logit_gradient(update: ObservedUpdate, payload: ServerPayload) -> torch.Tensor | None:
    """The site's gradient w.r.t. its logits, V x 1 x K, where the update holds it exactly: one image per
    update and a classifier with a bias, whose gradient it is. None otherwise."""
    if update.batch_size != 1:
        return None
    _, bias = last_layer(update.gradients, payload.num_classes)
    return None if bias is None else update.gradients[bias][:, None, :]


def matching_objective(payload: ServerPayload, update: ObservedUpdate, fixed_targets: torch.Tensor | None,
                        batch: int, shape: tuple[int, int, int], logit_gradient: torch.Tensor | None = None,
                        scale: torch.Tensor | None = None, support: dict[str, torch.Tensor] | None = None,
                        distance: str = "l2"):
    """objective(z, victims) for the batched optimiser: z holds each victim's flat images (+ soft labels).
    With `logit_gradient` (V x B x K) the candidate's gradient is that vector's backward pass; with `scale`
    (V) each victim's distance and its gradient are divided by it; with `support` (name -> V x shape of
    1 kept, 0 left out, or a weight in between) each entry's difference is multiplied by it."""
    n_pixels = batch * shape[0] * shape[1] * shape[2]
    V = payload.n_victims

    if isinstance(payload.model, LeNet):
        # The paper's LeNets: the same loss and gradient from explicit grouped convolutions (much faster).
        def prepare(params, observed, targets, logit_grad, kept):
            return LeNetGradientDistance(payload.model, params, observed, targets, batch, shape, logit_grad,
                                         support=kept, distance=distance)
    else:
        fmodel = functional_model(payload.model, payload.bn_mode)

        def compare(candidate, observed, kept):
            if distance == "cosine":  # a support is a weight of 1 or 0 on each entry
                return cosine_distance(candidate, observed, kept or {n: 1.0 for n in observed})
            if kept is not None:
                candidate = {n: candidate[n] * kept[n] for n in observed}
            return l2_distance(candidate, observed)

        def victim_loss(z, params, observed, targets, logit_grad, kept):
            images = z[:n_pixels].reshape(batch, *shape)
            if logit_grad is not None:  # the backward pass of the site's own logit gradient
                candidate = grad(lambda p: (functional_call(fmodel, p, (images,)) * logit_grad).sum())(params)
                return compare(candidate, observed, kept)
            if targets is None:
                targets = z[n_pixels:].reshape(batch, -1).softmax(-1)
            return compare(parameter_gradient(fmodel, params, images, targets), observed, kept)

        per_victim = vmap(grad_and_value(victim_loss), in_dims=(
            0, 0, 0, 0 if fixed_targets is not None else None, 0 if logit_gradient is not None else None,
            0 if support is not None else None))

        def prepare(params, observed, targets, logit_grad, kept):
            def loss_and_gradient(z):
                gradient, loss = per_victim(z, params, observed, targets, logit_grad, kept)
                return loss, gradient
            return loss_and_gradient

    prepared: dict = {}

    def objective(z: torch.Tensor, victims: torch.Tensor):
        """Loss and gradient of the running victims; their weights, updates and targets are picked out
        (and the loss prepared for them) only when the set of running victims changes."""
        if prepared.get("victims") is None or not torch.equal(prepared["victims"], victims):
            everyone = len(victims) == V and torch.equal(victims, torch.arange(V, device=victims.device))
            pick = (lambda t: t) if everyone else (lambda t: t[victims])
            prepared["victims"] = victims
            prepared["loss_and_gradient"] = prepare(
                {n: pick(p) for n, p in payload.params.items()}, {n: pick(g) for n, g in update.gradients.items()},
                pick(fixed_targets) if fixed_targets is not None else None,
                pick(logit_gradient) if logit_gradient is not None else None,
                {n: pick(k) for n, k in support.items()} if support is not None else None)
            prepared["scale"] = None if scale is None else pick(scale)
        loss, gradient = prepared["loss_and_gradient"](z)
        if prepared["scale"] is not None:
            loss, gradient = loss / prepared["scale"], gradient / prepared["scale"][:, None]
        return loss, gradient

    return objective


def _with_tv_prior(objective, weight: float, batch: int, shape: tuple[int, int, int]):
    """`objective` plus `weight` times each victim's total variation (objectives.total_variation) of its
    candidate images, and its gradient: a prior for smooth images where the update alone is ambiguous."""
    n_pixels = batch * shape[0] * shape[1] * shape[2]
    per_victim = vmap(grad_and_value(lambda x: total_variation(x[:n_pixels].reshape(batch, *shape))))

    def with_prior(z: torch.Tensor, victims: torch.Tensor):
        loss, gradient = objective(z, victims)
        tv_gradient, tv = per_victim(z)
        return loss + weight * tv, gradient + weight * tv_gradient

    return with_prior


def variant(name: str, **defaults) -> Callable[..., GradientMatchingAttack]:
    """build(**settings) of the gradient-matching attack `name`: `defaults` on the settings, then `settings`."""
    def build(**settings) -> GradientMatchingAttack:
        return GradientMatchingAttack(GradientMatchingSettings(**defaults), name=name, **settings)
    return build


# The papers' attacks. DLG (Zhu et al. 2019): image and soft label from N(0,1); iDLG (Zhao et al. 2020): label
# from the last layer's gradient, image from N(0,1); CPL (Wei et al. 2020): recovered label, patterned start.
dlg = variant("dlg", init="gaussian", labels="optimize")
idlg = variant("idlg", init="gaussian", labels="recover")
cpl = variant("cpl", init="pattern", labels="recover")

# Against distances relative to the update (cosine, or L2 over |o|^2). It rests on one comparison only:
# robust-cosine under Laplace 0.01 at 16 px on 4 embedded images reconstructed better with it than without;
# 1e-2 and other data were not tried.
ROBUST_TV_WEIGHT = 1e-3

# Attacks that know the defense (defense_aware): iDLG's label rule and L-BFGS, on a distance built for it.
# The candidate's logit gradient comes from its own softmax: a defended update's bias gradient is not exact.
# Top-k: only the entries the sparsified update kept (Huang et al. 2021 bypass pruning this way).
sparse_l2 = variant("sparse-l2", logit_gradient="candidate", support="observed")
sparse_cosine = variant("sparse-cosine", logit_gradient="candidate", support="observed", distance="cosine")
# Noise on every entry (added noise, DP-SGD, stochastic rounding): the observed update is an unbiased noisy
# estimate of the true one; a TV prior, and no fitting below the noise the defense implies.
robust_l2 = variant("robust-l2", logit_gradient="candidate", tv_weight=ROBUST_TV_WEIGHT, noise_floor=True)
robust_cosine = variant("robust-cosine", logit_gradient="candidate", distance="cosine", tv_weight=ROBUST_TV_WEIGHT,
                        noise_floor=True)
# Several rounds of one site behind the same images (FedSGD on a fixed batch): the robust distance summed over
# them (reconstruct_rounds), each round's noise an independent draw that the sum averages down.
multi_round = variant("multi-round", logit_gradient="candidate", tv_weight=ROBUST_TV_WEIGHT, noise_floor=True)

# `--paper`: the papers' procedure with their 300 L-BFGS steps.
_PAPER_STEPS = {"steps": 300, **PAPER_PROCEDURE}
_MATCHES = "until the update they would produce matches the observed one"
register(AttackEntry(
    "dlg", dlg, "Deep Leakage from Gradients: L-BFGS on image and soft label (Zhu et al. 2019)", "DLG",
    f"starts from random noise and a random label and adjusts both {_MATCHES} (Zhu et al. 2019)",
    default_model="lenet-dlg", paper_procedure=_PAPER_STEPS))
register(AttackEntry(
    "idlg", idlg, "Improved DLG: label from the last layer, L-BFGS on the image (Zhao et al. 2020)", "iDLG",
    "reads the label off the last layer of the update, then adjusts a random image until its update matches the "
    "observed one (Zhao et al. 2020)", default_model="lenet-idlg", paper_procedure=_PAPER_STEPS,
    strongest_when=lambda defenses: True))  # plain iDLG always: the strongest is never below it
register(AttackEntry(
    "cpl", cpl, "Catastrophic privacy leakage: iDLG with a patterned start (Wei et al. 2020)", "CPL",
    "like iDLG, but starts from a regular pattern instead of noise (Wei et al. 2020)", default_model="lenet-cpl",
    paper_procedure=_PAPER_STEPS))
_KEPT = "like iDLG, but compares only the parts of the update the defense kept, not those it dropped"
register(AttackEntry(
    "sparse-l2", sparse_l2, "iDLG on the entries a sparsified (top-k) update kept, L2 distance, restarts",
    "iDLG on kept entries (L2)", f"{_KEPT} (Huang et al. 2021)", default_model="lenet-idlg",
    strongest_when=sparse_update))
register(AttackEntry(
    "sparse-cosine", sparse_cosine, "iDLG on the entries a sparsified (top-k) update kept, cosine distance, "
    "restarts", "iDLG on kept entries (cosine)", f"{_KEPT}, and only their direction, not their size",
    default_model="lenet-idlg", strongest_when=sparse_update))
_NOISE = ("like iDLG, but knowing how much noise the defense adds: it favours smooth images and stops adjusting "
          "where the remaining mismatch is what the noise alone explains")
register(AttackEntry(
    "robust-l2", robust_l2, "iDLG on a noised or quantized update: L2 distance + TV prior, stops at the defense's "
    "noise floor", "noise-aware iDLG (L2)", _NOISE, default_model="lenet-idlg", strongest_when=noisy_update))
register(AttackEntry(
    "robust-cosine", robust_cosine, "iDLG on a noised, clipped or quantized update: cosine distance + TV prior, "
    "stops at the defense's noise floor", "noise-aware iDLG (cosine)",
    f"{_NOISE}; it compares directions only, so clipping's rescaling does not mislead it",
    default_model="lenet-idlg", strongest_when=noisy_update))
register(AttackEntry(
    "multi-round", multi_round, "robust-l2 on every round a curious server observed of one site behind the same "
    "images (FedSGD on a fixed batch): the rounds' distances summed, their independent noise averaged down",
    "noise-aware iDLG over rounds", f"{_NOISE}, matching every round it saw of the same images at once, so that "
    "the rounds' independent noise averages out", default_model="lenet-idlg", strongest_when=noisy_update,
    combines_rounds=True))
