"""The one-run privacy audit (Steinke, Nasr and Jagielski 2023): its p-value, its epsilon bound, its guesses."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from medpfl.defenses import DPSGD, Chain, ClientLevelDP, GaussianNoise
from medpfl.defenses.canaries import GradientCanaries
from medpfl.defenses.dp_audit import audit, correct_guesses, epsilon_lower_bound, p_value
from medpfl.errors import MedPFLError
from medpfl.experiments.privacy_audit import NoiselessClientDP, NoiselessDPSGD, parse_audit
from medpfl.experiments.train_run import TrainRunConfig, run_training
from medpfl.report import build_report

from killing import kill_after_lines, medpfl


def _exact_p_value(m: int, r: int, v: int, q: Fraction, delta: Fraction) -> Fraction:
    """Theorem 5.2's p-value in exact rational arithmetic, term by term (no scipy)."""
    pmf = [math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(r + 1)]
    tail = sum(pmf[v:], Fraction(0))
    alpha = max(sum(pmf[v - i:v], Fraction(0)) / i for i in range(1, v + 1))
    return min(Fraction(1), tail + 2 * m * delta * alpha)


@pytest.mark.parametrize("m,r,v,delta", [(20, 10, 9, Fraction(1, 100)), (50, 30, 22, Fraction(1, 1000)),
                                         (10, 6, 6, Fraction(0))])
def test_p_value_matches_exact_binomial_sums(m, r, v, delta):
    q = Fraction(3, 4)  # e^eps / (e^eps + 1) for eps = ln 3
    expected = float(_exact_p_value(m, r, v, q, delta))
    assert p_value(m, r, v, math.log(3), float(delta)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_without_delta_is_the_closed_form(r):
    # r of r right under eps-DP has chance q^r at most: the bound solves q^r = 0.05, eps = logit(0.05^(1/r)).
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    assert epsilon_lower_bound(1000, 100, 100, 0.0) == pytest.approx(3.4930, abs=1e-3)  # by hand: q = 0.970487


# Reference values from an independent implementation of the same Theorem 5.2: google-deepmind/jax_privacy,
# jax_privacy/auditing.py at commit 8967688c26d46f3b74bfdfe61ef1f984b887abab (2026-08-20), its
# _epsilon_one_run(0.0, m, r, v, significance, delta) (Brent's root finding, xtol 1e-6) and _one_run_p_value,
# computed with that file on its own (numpy, scipy, dp_accounting) and quoted here.
JAX_PRIVACY_BOUNDS = [  # (m, r, v, delta, significance, epsilon lower bound)
    (1000, 100, 100, 1e-5, 0.05, 3.465376229385333),
    (1000, 100, 90, 1e-5, 0.05, 1.6261436787042223),
    (1000, 200, 150, 1e-5, 0.05, 0.8199728373996844),
    (1000, 1000, 700, 1e-5, 0.05, 0.7317406384658977),
    (1000, 20, 20, 1e-5, 0.05 / 6, 1.214692492086419),
    (100, 50, 45, 1e-5, 0.05, 1.3927909762894453),
    (1000, 500, 400, 0.0, 0.05, 1.1986453137137123),
    (10000, 1000, 800, 1e-6, 0.05, 1.2539840913064186),
    (1000, 1000, 1000, 1e-5, 0.05, 5.782283131572193),
]
JAX_PRIVACY_P_VALUES = [  # (m, r, v, epsilon, delta, p-value)
    (1000, 100, 90, 1.0, 1e-5, 0.0008412885614385309),
    (1000, 200, 150, 0.5, 1e-5, 0.0006212078358387147),
    (100, 50, 45, 2.0, 1e-3, 0.476412509675328),
]


@pytest.mark.parametrize("m,r,v,delta,level,expected", JAX_PRIVACY_BOUNDS)
def test_bound_matches_jax_privacys_one_run_auditor(m, r, v, delta, level, expected):
    assert epsilon_lower_bound(m, r, v, delta, level) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("m,r,v,eps,delta,expected", JAX_PRIVACY_P_VALUES)
def test_p_value_matches_jax_privacys_one_run_auditor(m, r, v, eps, delta, expected):
    assert p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-12)


def test_delta_only_weakens_the_bound_and_chance_guessing_refutes_nothing():
    assert epsilon_lower_bound(1000, 100, 100, 1e-5) < epsilon_lower_bound(1000, 100, 100, 0.0)
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # half right: what a coin does


def test_bound_never_exceeds_the_epsilon_of_randomized_response():
    # Randomized response on each canary's membership is exactly eps-DP, and the best score there is: over
    # 40 audits the 95% bound may exceed eps at most by chance (about 2 of 40), and it detects the leak.
    eps = 2.0
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(40):
        included = rng.random(1000) < 0.5
        truthful = rng.random(1000) < math.exp(eps) / (1 + math.exp(eps))
        reported = np.where(truthful, included, ~included)
        bounds.append(audit(reported + 0.01 * rng.random(1000), included, delta=0.0).epsilon_lower)
    assert sum(b > eps for b in bounds) <= 4
    assert np.median(bounds) > 1.0


def test_guesses_count_the_top_as_in_and_the_bottom_as_out():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    assert correct_guesses(scores, included, 2, 2) == 1 + 1  # top two: one in; bottom two: one out
    assert correct_guesses(scores, included, 3, 3) == 2 + 2
    assert correct_guesses(scores, included, 1, 0) == 1


def test_perfect_scores_give_a_clearly_positive_bound_and_noise_gives_none():
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    assert audit(included + 0.01 * rng.random(1000), included, 1e-5).epsilon_lower > 4
    assert audit(rng.normal(size=1000), included, 1e-5).epsilon_lower < 0.5


# --- canaries in a training run (defenses.canaries, experiments.privacy_audit) ---

def _audited(tmp_path, chain: Chain, name: str, canaries: int = 200) -> dict:
    config = TrainRunConfig(model="lenet-idlg", norm="none", image_size=16, sites=2, site_images=16, rounds=3,
                            defense="+".join(d.label() for d in chain.defenses) or "none", audit_canaries=canaries)
    return run_training(config, tmp_path / name, chain=chain)["dp_audit"]


def test_a_dirac_canary_adds_clip_over_the_batch_to_its_own_coordinate():
    like = {"w": torch.zeros(3, 4), "b": torch.zeros(5)}  # 17 coordinates
    canaries = GradientCanaries.draw(6, [1.0], like, seed=0)  # one site, every record in every step
    dp = canaries.dpsgd(DPSGD(noise_multiplier=0.0, clip=2.0)).at_site(0)
    zeros = {n: torch.zeros(4, *t.shape) for n, t in like.items()}  # a batch of 4 examples with no gradient
    out = dp.private_gradient(zeros, torch.Generator(), batch_size=4)
    flat = torch.cat([out["w"].flatten(), out["b"].flatten()])
    expected = torch.zeros(17)
    expected[canaries.coordinates[torch.as_tensor(canaries.included)]] = 2.0 / 4
    assert canaries.included.any() and torch.allclose(flat, expected, atol=1e-6)


def test_noise_switched_off_under_an_unchanged_accountant_is_flagged(tmp_path):
    broken = _audited(tmp_path, Chain((NoiselessDPSGD(epsilon=1.0),)), "broken")
    honest = _audited(tmp_path, Chain((DPSGD(epsilon=1.0),)), "honest")
    assert broken["guarantee_broken"] and broken["epsilon_lower"] > broken["epsilon_upper"] == pytest.approx(1, 0.05)
    assert not honest["guarantee_broken"] and honest["epsilon_lower"] <= honest["epsilon_upper"]
    warning = "the DP mechanism or its accounting is broken"
    assert warning in build_report(tmp_path / "broken").read_text()
    assert warning not in build_report(tmp_path / "honest").read_text()


def test_canary_clients_flag_a_server_that_drops_client_level_noise(tmp_path):
    broken = _audited(tmp_path, Chain((NoiselessClientDP(noise_multiplier=5.0),)), "broken")
    honest = _audited(tmp_path, Chain((ClientLevelDP(noise_multiplier=5.0),)), "honest")
    assert broken["level"] == "client" and broken["guarantee_broken"]
    assert not honest["guarantee_broken"] and honest["epsilon_lower"] <= honest["epsilon_upper"]


def test_without_dp_the_canaries_are_detected_and_nothing_is_promised(tmp_path):
    plain = _audited(tmp_path, Chain(), "plain")
    assert plain["epsilon_upper"] is None and not plain["guarantee_broken"] and plain["epsilon_lower"] > 2


@pytest.mark.parametrize("text", ["canary=10", "canaries=1", "canaries=x"])
def test_a_bad_audit_option_is_refused_naming_it(text):
    with pytest.raises(MedPFLError, match="--audit-dp"):
        parse_audit(text)


def test_an_audit_of_a_defense_without_epsilon_is_refused_naming_it(tmp_path):
    with pytest.raises(MedPFLError, match="gaussian"):
        _audited(tmp_path, Chain((GaussianNoise(sigma=0.1),)), "heuristic")


@pytest.mark.parametrize("defense", ["dpsgd:epsilon=4", "cdp:noise=2"])
def test_an_audited_run_killed_and_resumed_measures_what_an_uninterrupted_one_does(tmp_path, defense):
    settings = dict(model="lenet-idlg", norm="none", image_size=16, sites=2, site_images=32, rounds=6, local_epochs=1,
                    defense=defense, audit_canaries=200)
    whole = run_training(TrainRunConfig(**settings), tmp_path / "whole")["dp_audit"]
    args = ["train", "--model", "lenet-idlg", "--norm", "none", "--image-size", "16", "--sites", "2", "--site-images",
            "32", "--rounds", "6", "--local-epochs", "1", "--defense", defense, "--audit-dp", "canaries=200", "--quiet",
            "--out", str(tmp_path / "killed")]
    rounds = tmp_path / "killed" / "rounds.jsonl"
    kill_after_lines(medpfl(*args), rounds, 2)
    assert 2 <= len(rounds.read_text().splitlines()) < 6 and not (tmp_path / "killed" / "dp_audit.json").exists()
    resumed = medpfl(*args)
    assert resumed.wait() == 0, resumed.stderr.read()
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())["dp_audit"]
    assert summary == whole and whole["epsilon_lower"] > 0
    scores = [json.loads((tmp_path / run / "dp_audit.json").read_text()) for run in ("whole", "killed")]
    # The same canaries, drawn and scored alike: every score equal up to float32 rounding. The whole run (this
    # process) and the resumed one (a fresh process) may reduce in another thread order: the cosines of the
    # canary clients differed by 4e-9 on 2 threads, where a canary drawn differently differs by its whole size.
    same = {k: v for k, v in scores[0].items() if k not in ("scores_in", "scores_out")}
    assert same == {k: v for k, v in scores[1].items() if k not in ("scores_in", "scores_out")}
    for side in ("scores_in", "scores_out"):
        assert scores[1][side] == pytest.approx(scores[0][side], rel=1e-5, abs=1e-7)
