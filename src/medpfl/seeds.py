"""Independent random streams from one user seed, named by a key (numpy's SeedSequence spawning)."""

from __future__ import annotations

import numpy as np
import torch

from medpfl.errors import MedPFLError

# Top-level streams of a run: each key below names draws that must not share a stream with the others.
MODEL_WEIGHTS = 0  # the victims' model weights
ATTACK_STARTS = 1  # the attacker's starting points (noise, patterns, restarts)
DEFENSE_NOISE = 2  # a defense's randomness on the sites' side (noise, stochastic rounding, DP-SGD)


def stream_seed(seed: int, *key: int) -> int:
    """A 63-bit seed for the stream `key` under `seed`: the state of SeedSequence(seed).spawn()'s child
    `key[0]`, its child `key[1]`, ..., so distinct keys give statistically independent streams."""
    if seed < 0:
        raise MedPFLError(f"--seed {seed} is negative; pass a seed of 0 or more.")
    state = np.random.SeedSequence(seed, spawn_key=tuple(key)).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)  # torch seeds are 64-bit; one bit less stays clear of sign trouble


def stream(seed: int, *key: int) -> torch.Generator:
    """A CPU torch.Generator on the stream `key` under `seed` (see `stream_seed`)."""
    return torch.Generator().manual_seed(stream_seed(seed, *key))
