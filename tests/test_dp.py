"""DP-SGD and privacy accounting against Opacus (and Flower's client-level accountant) on real images."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.defenses import DPSGD, ClientLevelDP, PrivacyLedger, epsilon_spent, parse_defense, per_example_gradients
from medpfl.defenses.base import flatten_sites, site_norms
from medpfl.errors import MedPFLError
from medpfl.fl.gradients import stack_params
from medpfl.models.registry import build_model


@pytest.fixture(scope="module")
def real_batch() -> tuple[torch.Tensor, torch.Tensor, int]:
    source = embedded_source()
    x, y = ImageDataset(source, sample_items(source.items, 8, seed=5), size=16).load_batch(range(8))
    return x, y, len(source.classes)


def test_clipped_summed_per_example_gradient_equals_opacus_on_the_same_batch(real_batch):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    x, y, K = real_batch
    model = build_model("convnet", K, 3, 16, norm="group", seed=0)
    clip = 0.05  # below most per-example norms, so clipping is exercised
    params = {n: p.detach() for n, p in model.named_parameters()}
    per_example = per_example_gradients(model, params, x, F.one_hot(y, K).float())
    assert (site_norms(per_example) > clip).sum() >= 6
    ours = DPSGD(noise_multiplier=0.0, clip=clip).private_gradient(per_example, torch.Generator(), batch_size=1)

    wrapped = GradSampleModule(copy.deepcopy(model))
    optimizer = DPOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=8)
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.pre_step()  # per-example clipping and summation
    for (name, _), p in zip(model.named_parameters(), wrapped.parameters()):
        assert torch.allclose(ours[name], p.summed_grad, atol=1e-6, rtol=1e-4), name


def test_dpsgd_site_gradients_clip_each_example_and_add_noise_of_std_sigma_clip_over_b(real_batch):
    x, y, K = real_batch
    models = [build_model("lenet-idlg", K, 3, 16, seed=s) for s in range(2)]
    params = stack_params([dict(m.named_parameters()) for m in models])
    images, labels = x.reshape(2, 4, *x.shape[1:]), y.reshape(2, 4)
    quiet = DPSGD(noise_multiplier=0.0, clip=1.0).site_gradients(models[0], params, images, labels, K,
                                                                  torch.Generator())
    # Noise-free: the mean of clipped per-example gradients has norm at most clip.
    assert (site_norms(quiet) <= 1.0 + 1e-5).all()
    noisy = DPSGD(noise_multiplier=2.0, clip=1.0).site_gradients(models[0], params, images, labels, K,
                                                                  torch.Generator().manual_seed(1))
    spread = (flatten_sites(noisy) - flatten_sites(quiet)).std().item()
    assert spread == pytest.approx(2.0 * 1.0 / 4, rel=0.05)


def test_dpsgd_refuses_batchnorm_pointing_to_group_norm(real_batch):
    x, y, K = real_batch
    model = build_model("convnet", K, 3, 16, norm="batch")
    params = stack_params([dict(model.named_parameters())])
    with pytest.raises(MedPFLError, match="--norm group"):
        DPSGD(noise_multiplier=1.0).site_gradients(model, params, x[None, :2], y[None, :2], K, torch.Generator())


def _google_event(noise: float, rate: float):
    from dp_accounting import dp_event

    gaussian = dp_event.GaussianDpEvent(noise)
    return gaussian if rate >= 1 else dp_event.PoissonSampledDpEvent(rate, gaussian)


# Independent accountants: Google's dp-accounting (RDP, and PLD, a numerically exact accountant like PRV).
@pytest.mark.parametrize("noise, rate, steps", [(1.3, 0.25, 12), (1.1, 0.1, 400), (0.8, 0.05, 2000),
                                                (3.0, 1.0, 10), (20.0, 1.0, 3)])
def test_run_epsilon_agrees_with_google_dp_accounting_over_every_recorded_step(noise, rate, steps):
    from dp_accounting import rdp
    from dp_accounting.pld import pld_privacy_accountant

    logging.getLogger("absl").setLevel(logging.ERROR)
    ledger = PrivacyLedger()
    for _ in range(steps):  # recorded one step at a time, as rounds go by: nothing resets between them
        ledger.record(noise, rate)
    assert ledger.steps == steps
    google_rdp = rdp.RdpAccountant()
    google_rdp.compose(_google_event(noise, rate), steps)
    assert ledger.epsilon(1e-5) == pytest.approx(google_rdp.get_epsilon(1e-5), rel=0.01)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(_google_event(noise, rate), steps)
    prv = ledger.epsilon(1e-5, "prv")
    assert prv == pytest.approx(pld.get_epsilon(1e-5), rel=0.02, abs=0.015)  # PRV's own error: 0.01
    assert prv < ledger.epsilon(1e-5, "rdp")  # RDP's conversion to (epsilon, delta) is loose


def test_accounting_keeps_opacus_order_warnings_off_the_console():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails: Opacus's grid ends at order 63, ours goes further
        assert 0 < epsilon_spent(50.0, 1.0, 2) < 0.2  # optimal order past 63
        assert epsilon_spent(3.0, 1.0, 10, accountant="prv") > 0


def test_noise_is_calibrated_for_the_worst_off_site_and_each_site_spends_its_own_epsilon():
    from opacus.accountants import RDPAccountant

    from medpfl.defenses.dpsgd import dp_schedules
    from medpfl.fl.local import LocalTraining
    from medpfl.fl.partition import federate

    n_images = federate(embedded_source(), 5, "dirichlet:0.3", 0).n_images
    training, rounds = LocalTraining("fedavg", epochs=2, batch_size=16), 5
    dp = DPSGD(epsilon=4.0).for_sites(dp_schedules(n_images, training, rounds))
    per_site = []
    for n in n_images:  # each site's own schedule, counted here from its size: Poisson rate 16/n, ceil(n/16) steps
        accountant = RDPAccountant()
        accountant.history = [(dp.noise_multiplier, min(1.0, 16 / n), rounds * 2 * -(-n // 16))]
        per_site.append(accountant.get_epsilon(1e-5))
    assert max(per_site) <= 4.0 and max(per_site) == pytest.approx(4.0, rel=0.02)
    assert min(per_site) < 0.9 * max(per_site)  # unequal sites spend unequally: one number for all would hide it
    assert dp.epsilon_spent() == pytest.approx(max(per_site), rel=0.02)


def test_local_dpsgd_samples_each_image_independently_at_every_step():
    """Fixed batches reused every epoch give every image the same number of steps; Poisson sampling (what the
    accountant assumes) gives each a Binomial(steps, rate) count. Each image here is one pixel of its own,
    so the weight change's column for that pixel counts the steps the image took part in."""
    from torch import nn

    from medpfl.defenses.dpsgd import dp_local_update
    from medpfl.fl.local import LocalTraining

    n, K = 64, 3
    images = torch.eye(n).reshape(n, 1, 1, n)
    labels = torch.arange(n) % K
    model = nn.Sequential(nn.Flatten(), nn.Linear(n, K, bias=False))
    torch.nn.init.zeros_(model[1].weight)  # every image's gradient (p - y) e_i^T has the same size
    params = {name: p.detach() for name, p in model.named_parameters()}
    training = LocalTraining("fedavg", epochs=4, batch_size=16, lr=1e-4)  # rate 0.25, 16 steps
    dp = DPSGD(noise_multiplier=0.0, clip=100.0)
    change = dp_local_update(model, params, images, labels, K, training, dp, torch.Generator().manual_seed(0))
    one_step = 1e-4 * (torch.full((K,), 1 / K) - torch.eye(K)[0]).norm() / 16  # lr x |p - y| / expected batch
    counts = change["1.weight"].norm(dim=0) / one_step
    assert torch.allclose(counts, counts.round(), atol=0.05)
    counts = counts.round()
    assert counts.mean().item() == pytest.approx(16 * 0.25, abs=0.8)
    assert 1.5 < counts.var().item() < 5.0  # Binomial(16, 0.25): variance 3; fixed batches: 0


@pytest.mark.parametrize("accountant, target", [("rdp", 1.0), ("rdp", 4.0), ("rdp", 16.0), ("prv", 4.0)])
def test_target_epsilon_run_lands_within_five_percent_of_its_target(accountant, target):
    sample_rate, steps = 0.05, 400
    dp = parse_defense(f"dpsgd:epsilon={target},accountant={accountant},rate={sample_rate},steps={steps}").local
    dp = dp.calibrated()
    ledger = PrivacyLedger()
    for _ in range(steps):
        ledger.record(dp.noise_multiplier, sample_rate)
    spent = ledger.epsilon(dp.delta, accountant)
    assert target * 0.95 <= spent <= target * 1.0001
    assert dp.epsilon_spent() == pytest.approx(spent)


def test_client_level_dp_clips_each_site_and_noises_the_aggregate():
    chain = parse_defense("cdp:noise=1.5,clip=1")
    assert chain.server.rounds == 20 and chain.epsilon() == pytest.approx(epsilon_spent(1.5, 1.0, 20))
    g = torch.Generator().manual_seed(0)
    updates = {"w": torch.randn(5, 20_000, generator=g) * 0.1}  # norms ~14, clipped to 1
    dp = ClientLevelDP(noise_multiplier=0.0, clip=1.0)
    clean = dp.aggregate(updates, g)["w"]
    expected = (updates["w"] / updates["w"].norm(dim=1, keepdim=True)).mean(0)
    assert torch.allclose(clean, expected, atol=1e-6)
    noisy = ClientLevelDP(noise_multiplier=1.5, clip=1.0).aggregate(updates, g)["w"]
    assert (noisy - clean).std().item() == pytest.approx(1.5 / 5, rel=0.03)


# Sampled sites (Poisson), and every site in every round (rate 1, as medpfl train --defense cdp runs it).
@pytest.mark.parametrize("noise, sampled, population, rounds", [(1.0, 10, 100, 50), (0.8, 5, 20, 20),
                                                                 (2.0, 2, 8, 100), (1.5, 5, 5, 20)])
def test_client_level_epsilon_agrees_with_flowers_privacy_accountant(noise, sampled, population, rounds):
    serverapp = pytest.importorskip("flwr.serverapp")
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's notes about excluded orders
    config = serverapp.PrivacyConfig(target_delta=1e-5, population_size=population,
                                     neighboring_relation=serverapp.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                     sampling_method=serverapp.SamplingMethod.POISSON)
    flower = serverapp.RdpAccountant(config)
    flower.compose(serverapp.GaussianPrivacyEvent(noise_multiplier=noise, sample_size=sampled,
                                                  population_size=population), count=rounds)
    ours = ClientLevelDP(noise_multiplier=noise, clip=1.0).epsilon(rounds, sampled, population)
    assert ours == pytest.approx(flower.get_epsilon(1e-5), rel=0.01)
