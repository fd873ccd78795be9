"""What an attacker that knows the defense reads from it: which attacks fit, and how much noise to expect.

The defense is part of the protocol the server configured (ServerPayload.defense): its kind and
parameters are known, its random draws are not. Pruning, quantization and noise are bypassed by
attackers that know them (Huang et al., NeurIPS 2021): match only what the sparsified update kept,
treat a stochastically quantized or noised update as an unbiased noisy estimate of the true one, and
stop fitting where the defense's noise begins.
"""

from __future__ import annotations

import torch

from medpfl.attacks.threat import ObservedUpdate, ServerPayload
from medpfl.defenses.chain import Chain

# Attacks for updates with entries dropped, and for updates with noise on every entry (added noise, DP-SGD,
# or the rounding of a stochastic quantizer; cosine also for clipping's unknown scale).
SPARSE_ATTACKS = ("sparse-l2", "sparse-cosine")
NOISE_ATTACKS = ("robust-l2", "robust-cosine")


def applicable_attacks(chain: Chain) -> list[str]:
    """The attacks `--attack strongest` runs on updates under `chain`: plain iDLG always (so that the
    strongest is never below it), then those built for the defenses the chain applies."""
    names = {d.name for d in chain.defenses}
    attacks = ["idlg"]
    if "topk" in names and "quant" not in names:  # quantization moves the dropped entries off zero
        attacks += SPARSE_ATTACKS
    if names & {"laplace", "gaussian", "dpsgd", "quant", "clip", "cdp"}:
        attacks += NOISE_ATTACKS
    return attacks


def noise_energy(payload: ServerPayload, update: ObservedUpdate) -> torch.Tensor:
    """The expected squared norm of the noise the defense put into each victim's observed update (V).

    Per entry: Laplace(b) 2 b^2, N(0, sigma^2) sigma^2, DP-SGD (noise multiplier z, clip C, B images)
    (z C / B)^2, a stochastic quantizer of step s about s^2 / 6 (p (1 - p) s^2 averaged over remainders p;
    s^2 / 12 rounding to nearest), with s read off each layer's observed lowest and highest level.
    Sparsified updates carry it on their kept entries only; a secure aggregate of k sites, 1/k of it."""
    gradients = update.gradients
    some = next(iter(gradients.values()))
    V = some.shape[0]
    kept = sum(((g != 0) if payload.applied("topk") else torch.ones_like(g, dtype=torch.bool)).flatten(1).sum(1)
               for g in gradients.values()).to(some.dtype)
    per_entry = torch.zeros(V, dtype=some.dtype, device=some.device)
    for defense in payload.defense.defenses:
        if defense.name == "laplace":
            per_entry += 2 * defense.b ** 2
        elif defense.name == "gaussian":
            per_entry += defense.sigma ** 2
        elif defense.name == "dpsgd" and defense.noise_multiplier is not None:
            per_entry += (defense.noise_multiplier * defense.clip / update.batch_size) ** 2
    energy = per_entry * kept
    quantizer = payload.applied("quant")
    if quantizer is not None:
        share = 1 / 6 if quantizer.stochastic else 1 / 12
        for g in gradients.values():
            rows = g.flatten(1)
            step = (rows.amax(1) - rows.amin(1)) / (2 ** quantizer.bits - 1)
            energy = energy + share * step ** 2 * rows.shape[1]
    return energy / payload.defense.sites_per_update
