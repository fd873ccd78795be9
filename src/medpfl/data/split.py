"""Deterministic, class-balanced sampling and group-aware train/test splits of listed items."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from medpfl.data.base import Item
from medpfl.errors import MedPFLError


def _by_id(items: Sequence[Item]) -> list[Item]:
    """Items sorted by id, so results do not depend on the order a file system listed them."""
    return sorted(items, key=lambda it: it.item_id)


def sample_items(items: Sequence[Item], n: int, seed: int, stratified: bool = True) -> list[Item]:
    """`n` items chosen with `seed`, as balanced across classes as their counts allow; same seed, same items."""
    if n < 0:
        raise MedPFLError(f"Sample size {n} is invalid; ask for zero or more images.")
    if n > len(items):
        raise MedPFLError(f"Asked for {n} images but the source holds only {len(items)}; lower the sample size.")
    ordered = _by_id(items)
    rng = np.random.default_rng(seed)
    if not stratified:
        picked = [ordered[i] for i in rng.permutation(len(ordered))[:n]]
        return picked
    pools: dict[int, list[Item]] = defaultdict(list)
    for it in ordered:
        pools[it.label].append(it)
    labels = sorted(pools)
    shuffled = {lab: [pools[lab][i] for i in rng.permutation(len(pools[lab]))] for lab in labels}
    # Water-filling: every class gets an equal share; classes that run out hand their remainder to the others.
    quota = dict.fromkeys(labels, 0)
    remaining = n
    open_labels = list(labels)
    while remaining > 0:
        open_labels = [lab for lab in open_labels if quota[lab] < len(shuffled[lab])]
        share, extra = divmod(remaining, len(open_labels))
        # Which classes get the leftover one-each is seeded too, so no class is systematically favoured.
        lucky = set(rng.permutation(open_labels)[:extra].tolist()) if extra else set()
        for lab in open_labels:
            take = min(share + (lab in lucky), len(shuffled[lab]) - quota[lab])
            quota[lab] += take
            remaining -= take
    picked = [it for lab in labels for it in shuffled[lab][: quota[lab]]]
    return [picked[i] for i in rng.permutation(len(picked))]


def train_test_split(
    items: Sequence[Item], test_fraction: float, seed: int, group_key: str = "group"
) -> tuple[list[Item], list[Item]]:
    """(train, test) stratified by label; items sharing `provenance[group_key]` always land on the same side."""
    if not 0.0 < test_fraction < 1.0:
        raise MedPFLError(f"test_fraction={test_fraction} is invalid; use a fraction strictly between 0 and 1.")
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in _by_id(items):
        key = it.provenance.get(group_key)
        groups[f"g:{key}" if key is not None else f"i:{it.item_id}"].append(it)
    # A group counts towards the class most of its items belong to (ties: the lowest label).
    by_label: dict[int, list[str]] = defaultdict(list)
    for key in sorted(groups):
        counts = Counter(it.label for it in groups[key])
        label = min(counts, key=lambda lab: (-counts[lab], lab))
        by_label[label].append(key)
    rng = np.random.default_rng(seed)
    test_keys: set[str] = set()
    for label in sorted(by_label):
        keys = [by_label[label][i] for i in rng.permutation(len(by_label[label]))]
        total = sum(len(groups[k]) for k in keys)
        target = test_fraction * total
        taken, n_test = 0, 0
        for k in keys:
            if n_test >= len(keys) - 1:
                break  # keep at least one group of every class for training
            size = len(groups[k])
            # Take a group only if that brings the test count closer to the target.
            if abs(taken + size - target) < abs(taken - target):
                test_keys.add(k)
                taken, n_test = taken + size, n_test + 1
        if n_test == 0 and len(keys) >= 2:
            test_keys.add(min(keys, key=lambda kk: len(groups[kk])))  # small classes still get one test group
    train = _by_id([it for k, members in groups.items() if k not in test_keys for it in members])
    test = _by_id([it for k, members in groups.items() if k in test_keys for it in members])
    return train, test
