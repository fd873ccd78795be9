"""Every random stream of a federated run, derived from its one seed, so that any engine draws the same numbers.

Streams are independent children of numpy's SeedSequence(seed): the partition, the model's initial
weights, each site's image order in each round, each site's own randomness (e.g. a defense's noise) in
each round, and the attacker's. The in-process engine and the Flower client both call these functions,
so a site shuffles its images identically whichever engine runs it.
"""

from __future__ import annotations

import numpy as np

# One spawn key per purpose; never renumber (results of earlier runs depend on them).
PARTITION, MODEL_INIT, SHUFFLE, SITE_NOISE, ATTACK = range(5)


def stream(seed: int, purpose: int, *keys: int) -> np.random.SeedSequence:
    """The SeedSequence of one purpose (and e.g. round, site), independent of every other stream of the run."""
    return np.random.SeedSequence(seed, spawn_key=(purpose, *keys))


def rng(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    """A numpy Generator on `stream(seed, purpose, *keys)`."""
    return np.random.default_rng(stream(seed, purpose, *keys))


def torch_seed(seed: int, purpose: int, *keys: int) -> int:
    """A 63-bit integer seed for torch.Generator / build_model, from `stream(seed, purpose, *keys)`."""
    return int(stream(seed, purpose, *keys).generate_state(1, np.uint64)[0] >> np.uint64(1))


def model_seed(seed: int) -> int:
    """The seed the global model's initial weights are drawn with."""
    return torch_seed(seed, MODEL_INIT)


def site_order(seed: int, round_index: int, site: int, n_images: int) -> np.ndarray:
    """The order in which `site` visits its `n_images` local images in round `round_index` (1-based)."""
    return rng(seed, SHUFFLE, round_index, site).permutation(n_images)
