"""What an attacker scores by guessing: the chance level a leak rate is read against.

Plain Python (no torch), so the report can compute it from a run directory's records.
"""

from __future__ import annotations

from collections import Counter
from math import comb
from typing import Iterable, Sequence


def label_chance(true_labels: Sequence[int], num_classes: int) -> float:
    """The expected share of one batch's `true_labels` that a guess of as many labels, each uniform over the
    `num_classes` classes, gets right when scored as multisets (as attacks are, `match_and_score`).

    1/K for one image; more for a batch, since B guesses have B chances to name each class present:
    with t images of class c and G ~ Binomial(B, 1/K) guesses of c, E[hits on c] = E[min(t, G)] = sum over
    j = 1..t of P(G >= j)."""
    B, p = len(true_labels), 1 / num_classes

    def at_least(j: int) -> float:
        return sum(comb(B, g) * p ** g * (1 - p) ** (B - g) for g in range(j, B + 1))

    return sum(at_least(j) for t in Counter(true_labels).values() for j in range(1, t + 1)) / B


def pooled_label_chance(batches: Iterable[Sequence[int]], num_classes: int) -> float | None:
    """`label_chance` over every image of several batches (each batch weighted by its number of images):
    the chance level of a label accuracy pooled over them. None where there are no images."""
    batches = [b for b in batches if len(b)]
    n = sum(len(b) for b in batches)
    return sum(label_chance(b, num_classes) * len(b) for b in batches) / n if n else None
