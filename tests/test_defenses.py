"""Defenses on known tensors: noise scale, clipping norm, sparsity, quantization levels, unbiased rounding,
secure aggregation's mean, the chain's order, and the spec parser's answers and errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

from medpfl.defenses import (Chain, ClipNorm, GaussianNoise, LaplaceNoise, Quantize, SecureAggregation, TopK,
                             parse_defense, parse_defenses)
from medpfl.defenses.base import flatten_sites, site_norms
from medpfl.errors import MedPFLError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def update(sites: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {"conv.weight": torch.randn(sites, 12, 3, 5, 5, generator=g), "fc.bias": torch.randn(sites, 10, generator=g)}


def test_laplace_noise_has_the_spread_of_laplace_b():
    b, zeros = 0.01, {"w": torch.zeros(2, 100_000)}
    noise = LaplaceNoise(b)(zeros, gen())["w"]
    # Laplace(0, b): mean |x| = b, standard deviation sqrt(2) b, median |x| = b ln 2.
    assert noise.abs().mean().item() == pytest.approx(b, rel=0.02)
    assert noise.std().item() == pytest.approx(math.sqrt(2) * b, rel=0.02)
    assert noise.abs().median().item() == pytest.approx(b * math.log(2), rel=0.03)
    assert abs(noise.mean().item()) < 5 * math.sqrt(2) * b / math.sqrt(noise.numel())
    assert torch.equal(LaplaceNoise(b)(zeros, gen())["w"], noise)  # same generator seed, same noise
    assert not torch.equal(LaplaceNoise(b)(zeros, gen(1))["w"], noise)


def test_laplace_noise_stays_finite_where_the_uniform_draw_is_exactly_its_edge():
    # torch.rand returns exactly 0 once in 2^24 float32 draws: a ConvNet's updates meet it within a few rounds,
    # and -b sign(u) log(1 - 2|u|) at u = -1/2 is infinite, which turned a whole federation into NaN.
    n = 1_000_000
    seed = next(s for s in range(1000) if (torch.rand(n, generator=gen(s)) == 0).any())
    edge = (torch.rand(n, generator=gen(seed)) == 0).nonzero()[0, 0]
    noise = LaplaceNoise(0.01)({"w": torch.zeros(n)}, gen(seed))["w"]
    assert torch.isfinite(noise).all()
    assert noise[edge].item() == pytest.approx(-0.01 * math.log(2 / torch.finfo(torch.float32).eps))  # u = -1/2: negative
    assert noise.abs().max() <= noise[edge].abs()  # the edge is the largest draw there can be, nothing beyond


def test_gaussian_noise_has_standard_deviation_sigma_around_the_update():
    u = update()
    noisy = GaussianNoise(0.1)(u, gen())
    diff = flatten_sites(noisy) - flatten_sites(u)
    assert diff.std().item() == pytest.approx(0.1, rel=0.03)
    assert abs(diff.mean().item()) < 0.01


def test_clip_norm_scales_each_site_down_to_the_bound_and_keeps_direction():
    u = update()
    u = {n: t * torch.tensor([0.01, 1.0, 10.0]).reshape(-1, *[1] * (t.dim() - 1)) for n, t in u.items()}
    norms = site_norms(u)
    assert norms[0] < 1 < norms[1] < norms[2]
    clipped = ClipNorm(1.0)(u, gen())
    after = site_norms(clipped)
    assert after[0].item() == pytest.approx(norms[0].item(), rel=1e-6)  # small updates untouched
    assert after[1:].tolist() == pytest.approx([1.0, 1.0], rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(flatten_sites(clipped), flatten_sites(u), dim=1)
    assert cosine.tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("prune", [0.1, 0.9, 0.99])
def test_topk_zeroes_the_pruned_share_of_smallest_entries_over_the_whole_update(prune):
    u = update()
    flat, kept = flatten_sites(u), flatten_sites(TopK(prune)(u, gen()))
    n = flat.shape[1]
    expected_kept = max(1, round((1 - prune) * n))
    assert (kept != 0).sum(1).tolist() == [expected_kept] * 3
    for s in range(3):  # the survivors are exactly the largest magnitudes, unchanged
        largest = flat[s].abs().topk(expected_kept).indices
        assert torch.equal(kept[s, largest], flat[s, largest])
    per_layer = TopK(prune, per_layer=True)(u, gen())
    for name, t in per_layer.items():
        assert ((t != 0).reshape(3, -1).sum(1) == max(1, round((1 - prune) * t[0].numel()))).all()


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantize_uses_at_most_two_to_the_bits_levels_on_an_even_grid(bits):
    u = update()
    for stochastic in (True, False):
        q = Quantize(bits, stochastic=stochastic)(u, gen())
        for name, t in q.items():
            for s in range(3):
                values, original = t[s].unique(), u[name][s]
                assert len(values) <= 2 ** bits
                step = (original.max() - original.min()) / (2 ** bits - 1)
                grid = (values - original.min()) / step
                assert torch.allclose(grid, grid.round(), atol=1e-3)
                assert values.min() >= original.min() - 1e-6 and values.max() <= original.max() + 1e-6
                if not stochastic:  # nearest level: off by at most half a step
                    assert (t[s] - original).abs().max() <= step / 2 + 1e-6


def test_stochastic_rounding_is_unbiased_and_nearest_rounding_is_not():
    values = torch.linspace(0, 1, 7) ** 2  # values between the 2-bit levels 0, 1/3, 2/3, 1
    draws = Quantize(2)({"w": values.repeat(4000, 1)}, gen())["w"]  # 4000 sites holding the same values
    step = 1 / 3
    # The mean of 4000 draws of a value rounded up with probability p has std <= step / 2 / sqrt(4000).
    assert (draws.mean(0) - values).abs().max() < 4 * step / 2 / math.sqrt(4000)
    assert len(draws.unique()) == 4
    nearest = Quantize(2, stochastic=False)({"w": values[None]}, gen())["w"][0]
    assert (nearest - values).abs().max() > 0.05


def test_secure_aggregation_shows_only_the_mean_of_each_group_of_k_sites():
    u = update(sites=6)
    seen = SecureAggregation(3)(u, gen())
    for name, t in seen.items():
        assert t.shape == (2, *u[name].shape[1:])
        assert torch.allclose(t[1], u[name][3:6].mean(0))
    with pytest.raises(ValueError, match="multiple of k"):
        SecureAggregation(4)(u, gen())


def test_chain_applies_clip_noise_sparsify_quantize_then_channel_whatever_the_given_order():
    chain = parse_defense("quant:bits=8+topk:prune=0.5+laplace:b=0.001+clip:norm=1+secagg:k=2")
    assert [d.name for d in chain.defenses] == ["clip", "laplace", "topk", "quant", "secagg"]
    assert chain.sites_per_update == 2
    u = update(sites=4)
    g1, g2 = gen(5), gen(5)
    by_hand = u
    for d in (ClipNorm(1.0), LaplaceNoise(0.001), TopK(0.5), Quantize(8), SecureAggregation(2)):
        by_hand = d(by_hand, g1)
    observed = chain.observe(u, g2)
    assert all(torch.equal(observed[n], by_hand[n]) for n in u)
    assert Chain().observe(u, gen()) is u and Chain().label() == "none"


def test_spec_lists_expand_to_one_chain_per_strength_and_labels_round_trip():
    specs = {"laplace:b=0.01,0.005,0.0033,0.0025": 4, "gaussian:sigma=0.1": 1, "clip:norm=1": 1,
             "topk:prune=0.9,0.99": 2, "quant:bits=4,8": 2, "dpsgd:epsilon=1,4,16": 3, "secagg:k=2,4,8": 3,
             "none": 1, "clip:norm=1,2+gaussian:sigma=0.1,0.2": 4}
    for spec, count in specs.items():
        chains = parse_defenses(spec)
        assert len(chains) == count, spec
        for chain in chains:
            assert parse_defense(chain.label()).label() == chain.label()
    assert [c.defenses[0].b for c in parse_defenses("laplace:b=0.01,0.005")] == [0.01, 0.005]
    dp = parse_defense("dpsgd:noise=1.1,clip=0.5").local
    assert (dp.noise_multiplier, dp.clip, dp.epsilon) == (1.1, 0.5, None)


@pytest.mark.parametrize("spec, words", [
    ("lap:b=1", ["Unknown defense 'lap'", "laplace", "secagg"]),
    ("laplace:c=1", ["no key 'c'", "valid keys: b"]),
    ("laplace:b=-1", ["b=-1", "positive"]),
    ("laplace", ["needs b="]),
    ("quant:bits=32", ["bits=32", "1 to 16"]),
    ("topk:prune=1", ["prune=1", "[0, 1)"]),
    ("secagg:k=1", ["k=1", "2 or more"]),
    ("dpsgd:clip=1", ["epsilon", "noise"]),
    ("dpsgd:epsilon=1,accountant=gdp", ["accountant=gdp", "rdp or prv"]),
    ("laplace:b=0.1,b=0.2", ["twice"]),
])
def test_bad_specs_are_refused_in_one_sentence_naming_the_key_and_the_choices(spec, words):
    with pytest.raises(MedPFLError) as err:
        parse_defenses(spec)
    message = str(err.value)
    assert not re.search(r"\. [A-Z]", message) and message.endswith(".")
    for word in words:
        assert word in message


def test_a_single_defense_option_refuses_a_list_of_strengths():
    with pytest.raises(MedPFLError, match="sweep"):
        parse_defense("laplace:b=0.01,0.005")
