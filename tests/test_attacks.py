"""Gradient-matching attacks on real images: recovery, labels, the batched optimiser, honest scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad_and_value, vmap

from medpfl.attacks import ObservedUpdate, ServerPayload, build_attack
from medpfl.attacks.gradient_matching import (PAPER_PROCEDURE, GradientMatchingSettings, matching_objective,
                                              observed_logit_gradient)
from medpfl.attacks.labels import count_labels, idlg_labels
from medpfl.attacks.lenet_matching import LeNetGradientDistance
from medpfl.attacks.objectives import l2_distance
from medpfl.attacks.optim import Restart, lbfgs
from medpfl.attacks.reference import reference_gradient_matching
from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.fl.gradients import (functional_model, parameter_gradient, site_gradients, soft_cross_entropy,
                                stack_params)
from medpfl.metrics.image import ssim
from medpfl.metrics.privacy import match_and_score
from medpfl.models.registry import build_model


@pytest.fixture(scope="module")
def real_images() -> tuple[torch.Tensor, torch.Tensor, int]:
    """16 real embedded images at 16 x 16 (two or three per modality) and their labels."""
    source = embedded_source()
    items = sample_items(source.items, 16, seed=3)
    x, y = ImageDataset(source, items, size=16).load_batch(range(16))
    return x, y, len(source.classes)


def victims(model_name: str, images: torch.Tensor, labels: torch.Tensor, K: int, dtype=torch.float32):
    """Payload and observed update for victims V x B x C x H x W, one freshly drawn model each."""
    models = [build_model(model_name, K, images.shape[2], images.shape[-1], seed=v).to(dtype)
              for v in range(images.shape[0])]
    params = stack_params([dict(m.named_parameters()) for m in models])
    gradients = site_gradients(models[0], params, images.to(dtype), labels, K)
    payload = ServerPayload(models[0], params, K, tuple(images.shape[2:]))
    return models, payload, ObservedUpdate(gradients, images.shape[1])


def test_batched_lbfgs_follows_torch_lbfgs_per_victim(real_images):
    """Two victims attacked together end exactly where torch.optim.LBFGS takes each one alone."""
    x, y, K = real_images
    images, labels = x[:2, None].double(), y[:2, None]
    models, payload, update = victims("lenet-idlg", images, labels, K, torch.float64)
    settings = GradientMatchingSettings(steps=4, max_iter=5, history_size=6, **PAPER_PROCEDURE)
    attack = build_attack("idlg", steps=4, max_iter=5, history_size=6, **PAPER_PROCEDURE)
    start = attack.initial_images(2, images.shape[2:], torch.Generator().manual_seed(0)).double()
    result = attack.reconstruct(payload, update, torch.Generator().manual_seed(0))
    for v in range(2):
        observed = [update.gradients[n][v] for n, _ in models[v].named_parameters()]
        expected, _, _, evaluations = reference_gradient_matching(
            models[v], observed, start[v:v + 1], labels[v], K, settings)
        assert torch.allclose(result.images[v, 0], expected[0], atol=1e-10), f"victim {v} left torch's path"
        assert result.evaluations[v] <= evaluations  # re-evaluations of the same point are skipped


def test_generic_objective_equals_plain_autograd_per_victim(real_images):
    """Models other than the LeNets take the torch.func path: each victim's loss and image gradient as
    plain autograd through its own model computes them."""
    x, y, K = real_images
    images, labels = x[:2, None].double(), y[:2, None]
    models, payload, update = victims("convnet", images, labels, K, torch.float64)
    targets = F.one_hot(labels, K).double()
    z = torch.rand(2, images[0].numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss, gradient = matching_objective(payload, update, targets, 1, tuple(images.shape[2:]))(z, torch.arange(2))
    for v in range(2):
        candidate = z[v].reshape(images[v].shape).clone().requires_grad_(True)
        site = torch.autograd.grad(soft_cross_entropy(models[v](candidate), targets[v]),
                                   list(models[v].parameters()), create_graph=True)
        expected = sum(((g - update.gradients[n][v]) ** 2).sum()
                       for g, (n, _) in zip(site, models[v].named_parameters()))
        assert torch.allclose(loss[v], expected, rtol=1e-10)
        expected_grad = torch.autograd.grad(expected, candidate)[0].flatten()
        assert torch.allclose(gradient[v], expected_grad, rtol=1e-8, atol=1e-12 * expected_grad.abs().max())


@pytest.mark.parametrize("model_name", ["lenet-dlg", "lenet-idlg", "lenet-cpl"])
@pytest.mark.parametrize("batch,soft_labels", [(1, False), (2, True)])
def test_lenet_objective_written_out_equals_autograd_of_the_site_gradient(real_images, model_name, batch, soft_labels):
    """The explicit LeNet passes give torch.func's loss and gradient (images and DLG's soft labels)."""
    x, y, K = real_images
    images, labels = x[:6].reshape(3, 2, *x.shape[1:])[:, :batch].double(), y[:6].reshape(3, 2)[:, :batch]
    models, payload, update = victims(model_name, images, labels, K, torch.float64)
    n_pixels = images[0].numel()
    z = torch.randn(3, n_pixels + (batch * K if soft_labels else 0), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    targets = None if soft_labels else F.one_hot(torch.tensor([[1, 4], [0, 0], [5, 2]])[:, :batch], K).double()
    fmodel = functional_model(models[0])

    def victim_loss(z, params, observed, targets):
        candidate = z[:n_pixels].reshape(images.shape[1:])
        targets = z[n_pixels:].reshape(batch, K).softmax(-1) if targets is None else targets
        return l2_distance(parameter_gradient(fmodel, params, candidate, targets), observed)

    expected_grad, expected = vmap(grad_and_value(victim_loss), in_dims=(0, 0, 0, None if soft_labels else 0))(
        z, payload.params, update.gradients, targets)
    loss, gradient = LeNetGradientDistance(models[0], payload.params, update.gradients, targets, batch,
                                           tuple(images.shape[2:]))(z)
    assert torch.allclose(loss, expected, rtol=1e-10, atol=0)
    assert torch.allclose(gradient, expected_grad, rtol=1e-9, atol=1e-12 * expected_grad.abs().max())


def _rosenbrock(scale: torch.Tensor):
    """Per victim a chained Rosenbrock valley of its own steepness: objective(x, victims) and its plain form."""
    def plain(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return (a * (x[..., 1:] - x[..., :-1] ** 2) ** 2 + (1 - x[..., :-1]) ** 2).sum(-1)

    def objective(x: torch.Tensor, victims: torch.Tensor):
        x = x.detach().requires_grad_(True)
        loss = plain(x, scale[victims, None])
        return loss.detach(), torch.autograd.grad(loss.sum(), x)[0]
    return objective, plain


@pytest.mark.parametrize("max_active", [None, 2, 1])
def test_batched_lbfgs_follows_torch_lbfgs_through_a_full_history(max_active):
    """Victims that stop at different times and whose short history is replaced many times over; with
    max_active, waiting victims start as running ones finish, and nothing else changes."""
    scale = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    x0 = torch.tensor([[-1.2, 1.0, -0.5, 0.3, 1.5, -1.0]], dtype=torch.float64).repeat(3, 1)
    x0 += 0.1 * torch.arange(3, dtype=torch.float64)[:, None]
    objective, plain = _rosenbrock(scale)
    settings = dict(lr=1.0, max_iter=7, history_size=3, tolerance_grad=1e-9, tolerance_change=1e-12)
    result = lbfgs(objective, x0, steps=12, max_active=max_active, **settings)
    for v in range(3):
        x = x0[v].clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([x], **settings)

        def closure():
            optimizer.zero_grad()
            loss = plain(x, scale[v])
            loss.backward()
            return loss
        for _ in range(12):
            optimizer.step(closure)
        # Equal to rounding: batched and single dot products round differently on some CPUs' vector units
        # (3e-12 after 84 iterations down the steepest valley on one machine, 0 on another); leaving torch's
        # path shows as differences of order 1e-3 and more.
        assert torch.allclose(result.x[v], x.detach(), atol=1e-10, rtol=0), f"victim {v} left torch's path"
        assert optimizer.state[x]["n_iter"] > 3 * settings["history_size"]  # the history was replaced


def _double_well(x: torch.Tensor, victims: torch.Tensor):
    """Per victim sum of (x^2 - 1)^2 + x/2: a deep basin near -1 and a shallow one near +1."""
    return ((x * x - 1) ** 2 + 0.5 * x).sum(1), 4 * x * (x * x - 1) + 0.5


def test_restart_in_place_reruns_only_unsatisfied_victims_and_keeps_each_ones_best_run():
    shallow, deep = torch.full((1, 4), 1.2, dtype=torch.float64), torch.full((1, 4), -1.2, dtype=torch.float64)
    alone = lbfgs(_double_well, torch.cat([shallow, deep]), steps=20)
    assert alone.loss[0] > 0 > alone.loss[1] and alone.runs.tolist() == [1, 1]

    # Unsatisfied with the shallow basin: victim 0 starts again from the deep side; victim 1 runs once.
    fresh = lambda n: deep.expand(n, -1).clone()  # noqa: E731
    result = lbfgs(_double_well, torch.cat([shallow, deep]), steps=20,
                   restart=Restart(tries=3, unsatisfied=lambda v, loss: loss > 0, draw=fresh))
    assert result.runs.tolist() == [2, 1]
    assert torch.allclose(result.x, alone.x[[1, 1]]) and (result.loss < 0).all()
    assert result.evaluations[0] == alone.evaluations.sum()  # both runs are charged to victim 0
    one_at_a_time = lbfgs(_double_well, torch.cat([shallow, deep]), steps=20, max_active=1,
                          restart=Restart(tries=3, unsatisfied=lambda v, loss: loss > 0, draw=fresh))
    assert torch.equal(one_at_a_time.x, result.x) and torch.equal(one_at_a_time.runs, result.runs)

    # Never satisfied, and every fresh start is worse: the first run is the answer.
    result = lbfgs(_double_well, deep, steps=20,
                   restart=Restart(tries=2, unsatisfied=lambda v, loss: torch.ones_like(loss, dtype=torch.bool),
                                   draw=lambda n: shallow.expand(n, -1).clone()))
    assert result.runs.tolist() == [3]
    assert torch.equal(result.x, alone.x[1:]) and result.loss.item() == alone.loss[1].item()


def test_idlg_recovers_a_real_image_and_scores_an_unrelated_one_low(real_images):
    x, y, K = real_images
    images, labels = x[:1, None], y[:1, None]
    _, payload, update = victims("lenet-idlg", images, labels, K)
    result = build_attack("idlg", steps=60).reconstruct(payload, update, torch.Generator().manual_seed(1))
    assert result.labels.tolist() == labels.tolist()
    assert ssim(result.images[:, 0], images[:, 0]).item() > 0.95
    # A different real image of the same size is nowhere near: the scorer is not fooled by statistics.
    assert ssim(x[5:6], images[:, 0]).item() < 0.5


def test_idlg_label_rule_is_exact_for_single_images(real_images):
    x, y, K = real_images
    _, _, update = victims("lenet-idlg", x[:, None], y[:, None], K)
    assert idlg_labels(update, K).squeeze(1).tolist() == y.tolist()


def test_count_labels_recovers_repeated_labels_in_batches(real_images):
    x, y, K = real_images
    # Four victims of four images each, two of them holding one class twice or more.
    order = torch.tensor([0, 1, 2, 3, 4, 4, 5, 6, 7, 7, 7, 8, 9, 10, 11, 12])
    images, labels = x[order].reshape(4, 4, *x.shape[1:]), y[order].reshape(4, 4)
    _, payload, update = victims("lenet-idlg", images, labels, K)
    recovered = count_labels(update, payload)
    assert recovered.tolist() == labels.sort(1).values.tolist()


def test_dlg_recovers_image_and_label_together(real_images):
    x, y, K = real_images
    images, labels = x[2:3, None], y[2:3, None]
    _, payload, update = victims("lenet-dlg", images, labels, K)
    result = build_attack("dlg", steps=60).reconstruct(payload, update, torch.Generator().manual_seed(0))
    assert result.labels.tolist() == labels.tolist()
    assert ssim(result.images[:, 0], images[:, 0]).item() > 0.9


def test_cpl_converges_on_a_large_update_with_the_relative_distance():
    """CPL's LeNet at 32 px shares updates of norm ~100 or more, so the relative distance is flat in pixel
    units; a curvature test absolute in those units dropped every L-BFGS pair and the run crawled."""
    source = embedded_source()
    x, y = ImageDataset(source, sample_items(source.items, 1, seed=0), size=32).load_batch([0])
    _, payload, update = victims("lenet-cpl", x[:, None], y[:, None], len(source.classes))
    assert sum((g ** 2).sum() for g in update.gradients.values()).sqrt() > 50
    result = build_attack("cpl", steps=60, restarts=0).reconstruct(payload, update, torch.Generator().manual_seed(0))
    assert ssim(result.images[:, 0], x).item() > 0.9
    assert result.evaluations.item() < 600  # the crawl used all 60 x 20 evaluations


def test_cpl_pattern_start_is_a_tiled_patch():
    attack = build_attack("cpl")
    start = attack.initial_images(2, (3, 16, 16), torch.Generator().manual_seed(0))
    assert torch.equal(start[:, :, :8, :8], start[:, :, 8:, 8:])
    assert not torch.equal(start[0], start[1])


def test_matching_pairs_shuffled_reconstructions_with_their_originals(real_images):
    x, y, _ = real_images
    originals, labels = x[:4], y[:4]
    shuffled = originals[[2, 0, 3, 1]]
    score = match_and_score(originals, labels, shuffled, labels[[2, 0, 3, 1]])
    assert min(score.ssim) > 0.999
    assert all(score.label_correct)
    assert score.order == [1, 3, 0, 2]


def test_unknown_attack_setting_is_named():
    from medpfl.errors import MedPFLError

    with pytest.raises(MedPFLError, match="no setting 'stepz'"):
        build_attack("idlg", stepz=3)


def test_a_history_too_large_for_memory_is_refused_before_any_work(real_images):
    """An L-BFGS history that cannot fit is named with the setting to change, not left to the OOM killer."""
    from medpfl.errors import MedPFLError

    x, y, K = real_images
    _, payload, update = victims("lenet-idlg", x[:1, None], y[:1, None], K, torch.float32)
    attack = build_attack("idlg", history_size=10**9, restarts=0)
    with pytest.raises(MedPFLError, match=r"history_size=N\) or --image-size"):
        attack.reconstruct(payload, update, torch.Generator().manual_seed(0))


def confident_victim(size: int, channels: int, margin: float = 17.0):
    """A real CT image, true class 1 of 2, on a LeNet whose last-layer bias puts the true logit `margin`
    above the other (p(true) = 1 - 4e-8 at 17): its update is ~1e-13 in squared norm."""
    source = embedded_source()
    ct = [it for it in source.items if it.class_name == "CT"][:1]
    x, _ = ImageDataset(source, ct, size=size, channels=channels).load_batch([0])
    y = torch.tensor([[1]])
    model = build_model("lenet-idlg", 2, channels, size, seed=0)
    with torch.no_grad():
        logits = model(x)[0]
        model.fc.bias[1] += margin - (logits[1] - logits[0])
    params = stack_params([dict(model.named_parameters())])
    update = ObservedUpdate(site_gradients(model, params, x[:, None], y, 2), 1)
    return x, ServerPayload(model, params, 2, (channels, size, size)), update


def test_a_confident_models_tiny_update_is_reconstructed():
    """The paper's absolute tolerances end every run on a 1e-13 update at its first evaluation (flagged
    as stalled); relative to the update, the attack reconstructs the image."""
    x, payload, update = confident_victim(16, 1)
    assert sum((g ** 2).sum() for g in update.gradients.values()) < 1e-9
    paper = build_attack("idlg", steps=30, **{**PAPER_PROCEDURE, "restarts": 2})
    stuck = paper.reconstruct(payload, update, torch.Generator().manual_seed(0))
    assert stuck.evaluations.tolist() == [3] and stuck.extra["stalled_runs"].tolist() == [3]
    result = build_attack("idlg", steps=30, restarts=0).reconstruct(payload, update, torch.Generator().manual_seed(0))
    assert result.extra["stalled_runs"].tolist() == [0]
    assert ssim(result.images[:, 0], x).item() >= 0.9


@pytest.mark.parametrize("size,channels", [(32, 3), (64, 1)])
def test_the_true_image_matches_a_confident_update_exactly(size, channels):
    """At the true image the relative distance is zero to float32 precision with the logit gradient read
    off the update, however saturated the softmax; from the candidate's own softmax, float32 keeps no
    trace of p(true) - 1 = -4e-8 and the true image is far from a match."""
    x, payload, update = confident_victim(size, channels)
    scale = sum((g.flatten(1) ** 2).sum(1) for g in update.gradients.values())
    truth = x.reshape(1, -1)
    targets = F.one_hot(torch.tensor([[1]]), 2).float()
    observed = matching_objective(payload, update, targets, 1, x.shape[1:], observed_logit_gradient(update, payload),
                             scale)(truth, torch.arange(1))[0]
    from_softmax = matching_objective(payload, update, targets, 1, x.shape[1:], None, scale)(truth, torch.arange(1))[0]
    assert observed.item() < 1e-10 and from_softmax.item() > 1e-3


def test_binary_victims_of_two_embedded_classes_are_reconstructed():
    """Two-class task (CT vs MR), two victims on fresh models, however confident those happen to be."""
    source = embedded_source()
    pair = [it for it in source.items if it.class_name in ("CT", "MR")]
    items = sample_items(pair, 2, seed=1)
    x, _ = ImageDataset(source, items, size=16).load_batch([0, 1])
    y = torch.tensor([[int(it.class_name == "MR")] for it in items])
    models = [build_model("lenet-idlg", 2, 3, 16, seed=v) for v in range(2)]
    params = stack_params([dict(m.named_parameters()) for m in models])
    update = ObservedUpdate(site_gradients(models[0], params, x[:, None], y, 2), 1)
    payload = ServerPayload(models[0], params, 2, (3, 16, 16))
    result = build_attack("idlg", steps=30).reconstruct(payload, update, torch.Generator().manual_seed(0))
    assert result.labels.tolist() == y.tolist()
    assert (ssim(result.images[:, 0], x) >= 0.9).all()


@pytest.mark.parametrize("model_name", ["lenet-idlg", "convnet"])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_distance_on_a_support_equals_autograd_of_the_distance_written_by_hand(real_images, model_name, distance):
    """Both objectives (the explicit LeNet passes, torch.func for other models) with a support (entries left
    out) and the cosine distance give the loss and image gradient of the distance written out here on the
    kept entries, through plain autograd."""
    x, y, K = real_images
    images, labels = x[:2, None].double(), y[:2, None]
    models, payload, update = victims(model_name, images, labels, K, torch.float64)
    generator = torch.Generator().manual_seed(1)
    support = {n: (torch.rand(g.shape, generator=generator, dtype=torch.float64) < 0.5).double()
               for n, g in update.gradients.items()}
    observed = {n: g * support[n] for n, g in update.gradients.items()}
    targets = F.one_hot(labels, K).double()
    z = torch.rand(2, images[0].numel(), dtype=torch.float64, generator=generator)
    objective = matching_objective(payload, ObservedUpdate(observed, 1), targets, 1, tuple(images.shape[2:]),
                                    support=support, distance=distance)
    loss, gradient = objective(z, torch.arange(2))
    for v in range(2):
        candidate = z[v].reshape(images[v].shape).clone().requires_grad_(True)
        site = torch.autograd.grad(soft_cross_entropy(models[v](candidate), targets[v]),
                                   list(models[v].parameters()), create_graph=True)
        kept = [(g * support[n][v], observed[n][v]) for g, (n, _) in zip(site, models[v].named_parameters())]
        if distance == "l2":
            expected = sum(((g - o) ** 2).sum() for g, o in kept)
        else:
            dot = sum((g * o).sum() for g, o in kept)
            norms = sum((g * g).sum() for g, _ in kept).sqrt() * sum((o * o).sum() for _, o in kept).sqrt()
            expected = 1 - dot / norms
        assert torch.allclose(loss[v], expected, rtol=1e-10)
        expected_grad = torch.autograd.grad(expected, candidate)[0].flatten()
        assert torch.allclose(gradient[v], expected_grad, rtol=1e-8, atol=1e-12 * expected_grad.abs().max())
