"""What an attacker that knows the defense reads from it: which attacks fit, and how much noise to expect.

The defense is part of the protocol the server configured (ServerPayload.defense): its kind and
parameters are known, its random draws are not. Pruning, quantization and noise are bypassed by
attackers that know them (Huang et al., NeurIPS 2021): match only what the sparsified update kept,
treat a stochastically quantized or noised update as an unbiased noisy estimate of the true one, and
stop fitting where the defense's noise begins.
"""

from __future__ import annotations

import torch

from medpfl.attacks.registry import ATTACKS, unrolling_attacks
from medpfl.attacks.threat import ObservedUpdate, ServerPayload
from medpfl.defenses.chain import Chain


def sparse_update(defenses: frozenset[str]) -> bool:
    """Whether updates under defenses named `defenses` have entries dropped (the sparse attacks fit them);
    quantization moves the dropped entries off zero."""
    return "topk" in defenses and "quant" not in defenses


def noisy_update(defenses: frozenset[str]) -> bool:
    """Whether updates under `defenses` carry noise on every entry (added noise, DP-SGD, or the rounding of a
    stochastic quantizer; clipping's unknown scale too, for the cosine): the robust attacks fit them."""
    return bool(defenses & {"laplace", "gaussian", "dpsgd", "quant", "clip", "cdp"})


# The robust distance summed over several rounds of one site behind the same images (reconstruct_rounds).
MULTI_ROUND = "multi-round"
STRONGEST = "strongest"  # every attack that fits (attacks.strongest)


def applicable_attacks(chain: Chain, rounds: int = 1, weight_change: bool = False) -> list[str]:
    """The attacks `--attack strongest` runs on updates under `chain`: the registered attacks whose entry
    says they fit its defenses (AttackEntry.strongest_when), in the registry's order; those that combine
    rounds only where `rounds` > 1 were observed of each victim behind the same images (each round's noise,
    or stochastic rounding, is an independent draw). GradInversion's BatchNorm prior (invgrad's bn_prior) is
    not among them: it needs BatchNorm on running statistics, and the LeNets these attacks run on have none.
    A `weight_change` of several FedAvg steps only the attacks that unroll local training invert."""
    if weight_change:
        return unrolling_attacks()
    names = frozenset(d.name for d in chain.defenses)
    return [e.name for e in ATTACKS.values() if e.strongest_when is not None and e.strongest_when(names)
            and (rounds > 1 or not e.combines_rounds)]


def noise_variance(payload: ServerPayload, update: ObservedUpdate) -> dict[str, torch.Tensor]:
    """Per parameter tensor, the variance the defense's noise has on each entry of each victim's observed
    update (name -> V).

    Laplace(b) 2 b^2, N(0, sigma^2) sigma^2, DP-SGD (noise multiplier z, clip C, B images) (z C / B)^2; a
    quantizer's rounding error from its step s, read off each layer's observed lowest and highest level.
    A secure aggregate of k sites carries 1/k of it."""
    some = next(iter(update.gradients.values()))
    added = 0.0
    for defense in payload.defense.defenses:
        if defense.name == "laplace":
            added += 2 * defense.b ** 2
        elif defense.name == "gaussian":
            added += defense.sigma ** 2
        elif defense.name == "dpsgd" and defense.noise_multiplier is not None:
            added += (defense.noise_multiplier * defense.clip / update.batch_size) ** 2
    variance = {n: torch.full((some.shape[0],), added, dtype=some.dtype, device=some.device)
                for n in update.gradients}
    quantizer = payload.applied("quant")
    if quantizer is not None:
        # Rounding error for remainders spread evenly between two levels: stochastic, p (1 - p) s^2 averaged
        # over p, s^2 / 6; to the nearest level s^2 / 12. The true remainders are unknown: stochastic rounding's
        # error on real updates was measured within a factor of 2 of it (tests/test_adaptive_attacks.py).
        share = 1 / 6 if quantizer.stochastic else 1 / 12
        for n, g in update.gradients.items():
            rows = g.flatten(1)
            variance[n] = variance[n] + share * ((rows.amax(1) - rows.amin(1)) / (2 ** quantizer.bits - 1)) ** 2
    return {n: v / payload.defense.sites_per_update for n, v in variance.items()}


def signal_weights(update: ObservedUpdate, variance: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per parameter tensor, the share of its observed energy that is signal rather than the defense's noise
    (a Wiener weight, name -> V): a layer whose entries are mostly noise is matched with a weight near 0."""
    weights = {}
    for n, g in update.gradients.items():
        power = g.flatten(1).square().mean(1)
        weights[n] = ((power - variance[n]) / power.clamp_min(1e-30)).clamp(0, 1)
    return weights
