"""Empirical privacy auditing in one training run: a lower bound on epsilon from how well canaries are detected.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023): m canaries are
each included in training with probability 1/2, independently; after training the auditor scores every
canary, guesses "in" for its k+ highest scores and "out" for its k- lowest, and abstains on the rest. Under
(eps, delta)-DP the number of correct guesses among r = k+ + k- is stochastically dominated by
Binomial(r, e^eps / (e^eps + 1)) up to a delta term (their Theorem 5.2), so an observed count that this
tail makes unlikely (p < 1 - confidence) refutes eps: the largest refuted eps is a lower bound, at that
confidence, on the epsilon the mechanism really spends. The accountant's epsilon is an upper bound; a lower
bound above it means the mechanism or its accounting is broken.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import binom

from medpfl.errors import MedPFLError

CONFIDENCE = 0.95
# The guess counts k (as shares of m, half "in", half "out") the auditor may pick from after seeing the scores,
# each tested at (1 - confidence) / (number of counts) (Bonferroni), so picking the best stays honest. Few
# confident guesses win when canaries are barely detectable (strong DP), all of them when nearly all are.
GUESS_SHARES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_EPS_CEILING = 100.0  # no count of correct guesses among m <= 10^6 canaries refutes more


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The chance of v or more correct guesses out of r (m canaries) under (epsilon, delta)-DP.

    P[Binomial(r, q) >= v] + 2 m delta max_{1<=i<=v} P[v - i <= Binomial(r, q) < v] / i, q = e^eps/(e^eps+1)
    (Steinke, Nasr and Jagielski's Theorem 5.2 and their Algorithm for it)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    q = float(expit(epsilon))
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, tail)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, level: float = 1 - CONFIDENCE) -> float:
    """The largest epsilon that v correct guesses out of r still refute at p < `level` (0 if none does)."""
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level and high < _EPS_CEILING:
        low, high = high, 2 * high
    for _ in range(40):  # p_value grows with epsilon: bisect for where it crosses `level`
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < level else (low, mid)
    return low


def correct_guesses(scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int) -> int:
    """Correct guesses when the k_in highest-scoring canaries are guessed in and the k_out lowest out."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")  # ties: the lower index first
    member = np.asarray(included, dtype=bool)[order]
    return int(member[:k_in].sum() + (~member[len(member) - k_out:]).sum())


@dataclass(frozen=True)
class AuditResult:
    """The one-run audit's bound and the guesses behind it."""

    epsilon_lower: float  # at `confidence`, over the best of the guess counts tried (Bonferroni-corrected)
    confidence: float
    canaries: int  # m
    included: int  # canaries that were in training
    guesses: int  # r of the best guess count
    correct: int  # v of the best guess count
    delta: float

    def to_json(self) -> dict:
        return {"epsilon_lower": self.epsilon_lower, "confidence": self.confidence, "canaries": self.canaries,
                "included": self.included, "guesses": self.guesses, "correct": self.correct, "delta": self.delta}


def audit(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = CONFIDENCE) -> AuditResult:
    """Epsilon's lower bound from canary `scores` (higher: more likely in) and the truth `included`."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    if m < 2 or included.shape != scores.shape:
        raise MedPFLError(f"A privacy audit needs 2 or more canaries, each with a score; got {m}.")
    if not np.isfinite(scores).all():
        raise MedPFLError("A canary's audit score is not finite (the training diverged); rerun with a smaller --lr.")
    counts = sorted({min(m, max(2, round(share * m))) for share in GUESS_SHARES})
    level = (1 - confidence) / len(counts)
    best = AuditResult(0.0, confidence, m, int(included.sum()), 0, 0, delta)
    for k in counts:
        k_in = (k + 1) // 2
        v = correct_guesses(scores, included, k_in, k - k_in)
        eps = epsilon_lower_bound(m, k, v, delta, level)
        if eps > best.epsilon_lower or best.guesses == 0:
            best = AuditResult(eps, confidence, m, int(included.sum()), k, v, delta)
    return best
