"""Every random stream of a run, derived from its one seed: independent children of numpy's SeedSequence(seed),
named by a key (a purpose, then e.g. round and site).

Attack runs (`medpfl attack`) and federated runs (`medpfl train`, the sweep's utility, the Flower engines)
each number their own purposes below. The in-process engine and the Flower client call the same functions,
so a site shuffles its images identically whichever engine runs it. Never renumber a purpose, nor change
how a stream becomes a seed: results recorded earlier depend on both.
"""

from __future__ import annotations

import numpy as np
import torch

from medpfl.errors import MedPFLError

# Purposes of an attack run: each names draws that must not share a stream with the others.
MODEL_WEIGHTS = 0  # the victims' model weights
ATTACK_STARTS = 1  # the attacker's starting points (noise, patterns, restarts)
DEFENSE_NOISE = 2  # a defense's randomness on the sites' side (noise, stochastic rounding, DP-SGD)
# The victims' pretraining minibatches (--pretrain-steps). It shares DEFENSE_NOISE's number, so a pretrained,
# defended victim's minibatch order and noise come from one stream; kept, as results recorded earlier use it.
PRETRAIN_MINIBATCHES = 2

# Purposes of a federated run: the partition, the global model's initial weights, each site's image order in
# each round, each site's own randomness (e.g. a defense's noise) in each round, the attacker's, and SecAgg+'s
# stochastic rounding of each site's reply in each round (Flower's, from numpy's global generator).
PARTITION, MODEL_INIT, SHUFFLE, SITE_NOISE, ATTACK, SECAGG_ROUNDING = range(6)


def seed_sequence(seed: int, *key: int) -> np.random.SeedSequence:
    """The stream `key` under `seed`: SeedSequence(seed).spawn()'s child key[0], its child key[1], ..., so
    distinct keys give statistically independent streams."""
    if seed < 0:
        raise MedPFLError(f"--seed {seed} is negative; pass a seed of 0 or more.")
    return np.random.SeedSequence(seed, spawn_key=tuple(key))


def _state(seed: int, *key: int) -> np.uint64:
    return seed_sequence(seed, *key).generate_state(1, np.uint64)[0]


def stream_seed(seed: int, *key: int) -> int:
    """A 63-bit seed for the stream `key` of an attack run (its state's low 63 bits: torch seeds are 64-bit,
    one bit less stays clear of sign trouble)."""
    return int(_state(seed, *key)) & (2**63 - 1)


def stream(seed: int, *key: int) -> torch.Generator:
    """A CPU torch.Generator on the stream `key` of an attack run (see `stream_seed`)."""
    return torch.Generator().manual_seed(stream_seed(seed, *key))


def torch_seed(seed: int, purpose: int, *keys: int) -> int:
    """A 63-bit seed for torch.Generator / build_model on a federated run's stream (its state's high 63 bits)."""
    return int(_state(seed, purpose, *keys) >> np.uint64(1))


def numpy_global_seed(seed: int, purpose: int, *keys: int) -> int:
    """A 32-bit seed for numpy's legacy global generator (np.random.seed), which Flower's own parts draw from."""
    return torch_seed(seed, purpose, *keys) % 2**32


def rng(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    """A numpy Generator on a federated run's stream `(purpose, *keys)`."""
    return np.random.default_rng(seed_sequence(seed, purpose, *keys))


def model_seed(seed: int) -> int:
    """The seed the global model's initial weights are drawn with."""
    return torch_seed(seed, MODEL_INIT)


def site_order(seed: int, round_index: int, site: int, n_images: int) -> np.ndarray:
    """The order in which `site` visits its `n_images` local images in round `round_index` (1-based)."""
    return rng(seed, SHUFFLE, round_index, site).permutation(n_images)
