"""Rate intervals, checked against hand-computed closed forms and scipy's binomtest."""

import math

import pytest
from scipy.stats import binomtest

from medpfl.metrics.intervals import clopper_pearson, observed_rate_sentence, rate_interval, wilson

Z = 1.959963984540054


def test_wilson_zero_of_four_matches_its_closed_form():
    # At 0 successes Wilson's upper bound is z^2 / (n + z^2): 0.4899 for n = 4, the "up to 0.49" of a 4-image cell.
    rate = wilson(0, 4)
    assert rate.low == 0.0
    assert rate.high == pytest.approx(Z * Z / (4 + Z * Z), abs=1e-9)
    assert rate.high == pytest.approx(0.4899, abs=1e-4)


def test_clopper_pearson_zero_and_all_match_closed_forms():
    # 0 of n: upper = 1 - (alpha/2)^(1/n); n of n: lower = (alpha/2)^(1/n).
    assert clopper_pearson(0, 4).high == pytest.approx(1 - 0.025 ** 0.25, abs=1e-9)
    assert clopper_pearson(8, 8).low == pytest.approx(0.025 ** (1 / 8), abs=1e-9)


@pytest.mark.parametrize("k,n", [(0, 4), (1, 4), (3, 8), (7, 16), (16, 16), (13, 40)])
def test_both_intervals_agree_with_scipy_binomtest(k, n):
    ours, ref = wilson(k, n), binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert (ours.low, ours.high) == pytest.approx((ref.low, ref.high), abs=1e-9)
    ours, ref = clopper_pearson(k, n), binomtest(k, n).proportion_ci(0.95, method="exact")
    assert (ours.low, ours.high) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_rate_interval_rounds_a_share_back_to_counts():
    assert rate_interval(0.25, 8).successes == 2
    assert rate_interval(None, 8).trials == 0
    assert math.isclose(rate_interval(0.0, 4).high, wilson(0, 4).high)


def test_verdict_sentence_says_what_was_observed_not_safe():
    text = observed_rate_sentence("reconstructed", wilson(0, 4))
    assert "no attack tried reconstructed any of 4 images" in text and "up to 0.49" in text
    assert "safe" not in text
