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


def test_epsilon_over_a_whole_run_equals_opacus_privacy_engine_for_the_same_schedule(real_batch):
    from opacus import PrivacyEngine

    x, y, K = real_batch
    data = torch.utils.data.TensorDataset(x.repeat(4, 1, 1, 1), y.repeat(4))  # 32 examples
    model = build_model("lenet-idlg", K, 3, 16, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
                                                   data_loader=torch.utils.data.DataLoader(data, batch_size=8),
                                                   noise_multiplier=1.3, max_grad_norm=1.0)
    rounds, epochs_per_round = 3, 1  # a new round does not reset the accountant: the run's epsilon covers all
    for _ in range(rounds * epochs_per_round):
        for xb, yb in loader:
            if len(xb):
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                optimizer.step()
    steps = rounds * epochs_per_round * len(loader)
    ledger = PrivacyLedger()
    for _ in range(steps):
        ledger.record(1.3, 8 / 32)
    assert ledger.steps == steps == 12
    assert ledger.epsilon(1e-5) == pytest.approx(engine.get_epsilon(1e-5), rel=1e-9)
    assert epsilon_spent(1.3, 8 / 32, steps, 1e-5) == pytest.approx(engine.get_epsilon(1e-5), rel=1e-9)
    assert ledger.epsilon(1e-5, "prv") == pytest.approx(ledger.epsilon(1e-5, "rdp"), rel=0.25)  # PRV is tighter


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
