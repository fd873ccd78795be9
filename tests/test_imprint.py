"""The imprint attack reads an image alone in its bin exactly, from a real update of the model it sent."""

from __future__ import annotations

import pytest
import torch

from medpfl.attacks.imprint import (IMPRINT_BIAS, IMPRINT_WEIGHT, ImprintedModel, expected_share,
                                    imprint, quantile_edges, readout)
from medpfl.attacks.threat import ObservedUpdate, ServerPayload
from medpfl.defenses.secagg import SecureAggregation
from medpfl.errors import MedPFLError
from medpfl.experiments.attack_run import AttackRunConfig, run_attack
from medpfl.fl.gradients import functional_model, model_params, site_gradients
from medpfl.fl.local import LocalTraining, local_update
from medpfl.models.registry import build_model

SHAPE = (1, 8, 8)


def _flat(level: float, seed: int) -> torch.Tensor:
    """An 8x8 image of mean brightness `level` (a random pattern of zero mean on top)."""
    pattern = torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed)) * 0.2
    return (level + pattern - pattern.mean()).clamp(0, 1)


def _three_images() -> torch.Tensor:
    # Brightness 0.2 in bin [0.1, 0.5); 0.6 and 0.7 share bin [0.5, 0.9); nothing above 0.9.
    return torch.stack([_flat(0.2, 1), _flat(0.6, 2), _flat(0.7, 3)])


def _imprinted() -> ImprintedModel:
    body = build_model("lenet-idlg", 2, 1, 8, seed=0)
    return ImprintedModel(body, SHAPE, torch.tensor([-1.0, 0.1, 0.5, 0.9]))


def test_an_image_alone_in_its_bin_comes_back_exactly_and_shared_bins_do_not():
    model, images = _imprinted(), _three_images()
    assert torch.allclose(images.flatten(1).mean(1), torch.tensor([0.2, 0.6, 0.7]), atol=1e-6)
    update = site_gradients(model, model_params(model), images[None], torch.tensor([[0, 1, 0]]), 2)
    bins, weights = readout(update[IMPRINT_WEIGHT][0].double(), update[IMPRINT_BIAS][0].double())
    # Bin 0 (below 0.1) and bin 3 (above 0.9) are empty; bin 1 holds image 0 alone; bin 2 holds two.
    assert weights[0] == 0 and weights[3] == 0 and weights[1] != 0 and weights[2] != 0
    assert (bins[1] - images[0].flatten().double()).abs().max() < 1e-5
    for shared in images[1:]:
        assert (bins[2] - shared.flatten().double()).abs().max() > 1e-2


def test_the_readout_holds_for_one_fedavg_step_and_for_a_secure_aggregate():
    model, images = _imprinted(), _three_images()
    params = model_params(model)
    step = LocalTraining("fedavg", epochs=1, batch_size=3, lr=0.1)
    change = local_update(functional_model(model), {n: p[0] for n, p in params.items()}, images,
                          torch.tensor([0, 1, 0]), 2, step)
    bins, _ = readout(change[IMPRINT_WEIGHT].double(), change[IMPRINT_BIAS].double())
    assert (bins[1] - images[0].flatten().double()).abs().max() < 1e-5
    # Two sites, the second holding one image above 0.9 alone: the server sees only the mean of both.
    second = torch.stack([_flat(0.95, 4), _flat(0.6, 5), _flat(0.65, 6)])
    both = site_gradients(model, model_params(model, 2), torch.stack([images, second]),
                          torch.tensor([[0, 1, 0], [1, 1, 0]]), 2)
    aggregate = SecureAggregation(k=2)(both, torch.Generator())
    bins, _ = readout(aggregate[IMPRINT_WEIGHT][0].double(), aggregate[IMPRINT_BIAS][0].double())
    assert (bins[1] - images[0].flatten().double()).abs().max() < 1e-5
    assert (bins[3] - second[0].flatten().double()).abs().max() < 1e-5


def test_expected_share_agrees_with_a_simulation_of_bins():
    masses = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(masses, 5 * 20_000, replacement=True, generator=generator).reshape(20_000, 5)
    alone = (draws[:, :, None] == draws[:, None, :]).sum(2) == 1
    assert abs(alone.double().mean().item() - expected_share(masses, 5)) < 0.01
    # Edges at the public quantiles give equal masses on that same data.
    public = torch.rand(400, *SHAPE, generator=generator)
    bins = torch.bucketize(public.flatten(1).mean(1), quantile_edges(public, 8), right=True) - 1
    assert torch.bincount(bins, minlength=8).tolist() == [50] * 8


def test_the_attack_reads_batches_out_of_a_run_and_fails_with_one_bin(tmp_path):
    base = dict(attack="imprint", model="lenet-idlg", image_size=16, channels=1, batch_size=4, n_images=16, seed=0)
    fine = run_attack(AttackRunConfig(**base, settings={"bins": 64}), tmp_path / "fine")
    # 64 bins for 4 images: each image is alone with probability (1 - 1/64)^3 = 0.95 under equal masses.
    assert fine["asr"] >= 0.75 and fine["median_ssim"] > 0.999
    assert fine["site_check_refused"] == 4 and "imprint.weight (64 x 256)" in fine["site_check_reason"]
    one = run_attack(AttackRunConfig(**base, settings={"bins": 1}), tmp_path / "one")
    assert one["asr"] == 0


def test_the_attack_refuses_an_update_of_a_model_it_did_not_send():
    model = build_model("lenet-idlg", 2, 1, 8, seed=0)
    params = model_params(model)
    update = site_gradients(model, params, _three_images()[None], torch.tensor([[0, 1, 0]]), 2)
    with pytest.raises(MedPFLError, match="no imprint rows"):
        imprint().reconstruct(ServerPayload(model, params, 2, SHAPE), ObservedUpdate(update, 3), torch.Generator())


def test_medpfl_train_refuses_to_audit_dp_under_a_malicious_server(tmp_path):
    from medpfl.experiments.train_run import TrainRunConfig, run_training

    with pytest.raises(MedPFLError, match="--audit-dp audits .* drop it or --attack imprint"):
        run_training(TrainRunConfig(attack="imprint", attack_rounds=[1], attack_sites=[0], rounds=1,
                                    audit_canaries=2), tmp_path)


def test_gaussian_placement_puts_edges_at_the_fitted_normal_quartiles():
    from medpfl.attacks.imprint import gaussian_edges

    # Flat images of brightness 0.2, 0.4, 0.6: mean 0.4, sample standard deviation 0.2.
    public = torch.stack([torch.full(SHAPE, level) for level in (0.2, 0.4, 0.6)])
    z75 = 0.6744897501960817  # the standard normal's upper quartile, from tables
    expected = torch.tensor([-1.0, 0.4 - 0.2 * z75, 0.4, 0.4 + 0.2 * z75])
    assert torch.allclose(gaussian_edges(public, 4), expected, atol=1e-6)
    with pytest.raises(MedPFLError, match="placement=uniform is not one of auto, quantiles, gaussian"):
        imprint(placement="uniform").craft(build_model("lenet-idlg", 2, 1, 8), SHAPE, public, 2)


def _share_alone_by_hand(edges: torch.Tensor, cdf, batch: int) -> float:
    """Share of a batch alone in its bin, sum_k p_k (1 - p_k)^(B - 1), the masses p_k from the sites' true `cdf`."""
    cuts = [0.0] + [cdf(float(e)) for e in edges[1:]] + [1.0]
    return sum((b - a) * (1 - (b - a)) ** (batch - 1) for a, b in zip(cuts, cuts[1:]))


def _default_edges(levels: torch.Tensor, bins: int) -> torch.Tensor:
    """The edges of the model the attack sends by default, placed on flat public images of brightness `levels`,
    read back off its imprint biases (-gain x edge)."""
    public = levels.clamp(0, 1)[:, None, None, None].expand(-1, *SHAPE)
    attack = imprint(bins=bins)
    sent = attack.craft(build_model("lenet-idlg", 2, 1, 8, seed=0), SHAPE, public, 16)
    return -sent.imprint.bias.detach().double() / attack.settings.gain


def test_the_default_placement_holds_more_images_alone_than_quantiles_of_few_public_images():
    from statistics import NormalDist

    # Sites' brightness N(0.5, 0.1); the server holds 20 public images for 64 bins: their empirical quantiles
    # interpolate between 20 points and hold unequal masses of the sites' images, a fitted Gaussian nearly equal.
    sites, batch = NormalDist(0.5, 0.1), 16
    ideal = (1 - 1 / 64) ** (batch - 1)
    for seed in range(3):
        levels = 0.5 + 0.1 * torch.randn(20, generator=torch.Generator().manual_seed(seed))
        default = _share_alone_by_hand(_default_edges(levels, 64), sites.cdf, batch)
        interpolated = [float(torch.quantile(levels.clamp(0, 1).double(), k / 64)) for k in range(1, 64)]
        by_quantiles = _share_alone_by_hand(torch.tensor([-1.0] + interpolated), sites.cdf, batch)
        assert default > by_quantiles + 0.05 and default > ideal - 0.05


def test_the_default_placement_keeps_empirical_quantiles_when_brightness_is_far_from_gaussian():
    from statistics import NormalDist

    # A third of the sites' images near-black (empty slices at a volume's ends), the rest bright: a Gaussian
    # fitted to both puts most bins where no image lies; 100 public images for 64 bins.
    dark, bright, batch = NormalDist(0.1, 0.02), NormalDist(0.6, 0.05), 16
    cdf = lambda x: dark.cdf(x) / 3 + bright.cdf(x) * 2 / 3  # noqa: E731
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        is_dark = torch.arange(100) % 3 == 0
        levels = torch.where(is_dark, 0.1 + 0.02 * torch.randn(100, generator=generator),
                             0.6 + 0.05 * torch.randn(100, generator=generator))
        default = _share_alone_by_hand(_default_edges(levels, 64), cdf, batch)
        fit = NormalDist(float(levels.mean()), float(levels.std()))
        by_gaussian = _share_alone_by_hand(torch.tensor([-1.0] + [fit.inv_cdf(k / 64) for k in range(1, 64)]),
                                           cdf, batch)
        assert default > by_gaussian + 0.1
