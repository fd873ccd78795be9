"""Confidence intervals for rates measured on few images: an ASR of 0 of 4 is not a verdict of safety."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import beta, norm

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Rate:
    """A share of `successes` among `trials` with its two-sided interval at `confidence`."""

    successes: int
    trials: int
    low: float
    high: float
    confidence: float = CONFIDENCE

    @property
    def value(self) -> float | None:
        return self.successes / self.trials if self.trials else None

    def as_dict(self, prefix: str) -> dict[str, float | int | None]:
        """`prefix`_low / _high / _n, the fields summary.json and tradeoff.csv carry beside the rate itself."""
        return {f"{prefix}_low": self.low, f"{prefix}_high": self.high, f"{prefix}_n": self.trials}


def wilson(successes: int, trials: int, confidence: float = CONFIDENCE) -> Rate:
    """Wilson's score interval: close to nominal coverage even at 0 or n successes of a handful of trials."""
    if trials <= 0:
        return Rate(successes, 0, 0.0, 1.0, confidence)
    if not 0 <= successes <= trials:
        raise ValueError(f"successes ({successes}) must lie between 0 and trials ({trials})")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    # At 0 or n successes the bound is exact in theory; clamp the float rounding of centre -/+ half.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return Rate(successes, trials, low, high, confidence)


def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE) -> Rate:
    """The exact (conservative) binomial interval, from the beta distribution's quantiles."""
    if trials <= 0:
        return Rate(successes, 0, 0.0, 1.0, confidence)
    if not 0 <= successes <= trials:
        raise ValueError(f"successes ({successes}) must lie between 0 and trials ({trials})")
    tail = (1 - confidence) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    return Rate(successes, trials, low, high, confidence)


def rate_interval(share: float | None, trials: int, confidence: float = CONFIDENCE) -> Rate:
    """Wilson's interval for a share already computed as successes / trials (e.g. an ASR in a summary)."""
    if share is None or trials <= 0:
        return Rate(0, 0, 0.0, 1.0, confidence)
    return wilson(round(share * trials), trials, confidence)


def observed_rate_sentence(what: str, rate: Rate, unit: str = "images") -> str:
    """A verdict worded as what was observed, with how high the true rate may still be."""
    if rate.trials == 0:
        return f"no {unit} were scored for {what}."
    pct = f"{rate.confidence:.0%}"
    if rate.successes == 0:
        return (f"no attack tried {what} any of {rate.trials} {unit}; with {rate.trials} {unit} the true rate may "
                f"be up to {rate.high:.2f} ({pct} interval).")
    return (f"{what} {rate.successes} of {rate.trials} {unit} ({rate.value:.2f}; {pct} interval "
            f"{rate.low:.2f}-{rate.high:.2f}).")
