"""Inverting Gradients on small models and real retina crops: recovery, restart choice, batches, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from torch import nn

from medpfl.attacks.inverting_gradients import (InvertingGradients, InvertingGradientsSettings,
                                                batchnorm_statistics_distance, invgrad, median_filter)
from medpfl.attacks.optim import Checkpoint
from medpfl.attacks.threat import ObservedUpdate, ServerPayload
from medpfl.data.transforms import to_tensor
from medpfl.errors import MedPFLError
from medpfl.fl.gradients import functional_model, model_params, site_gradients
from medpfl.metrics.image import ssim
from medpfl.metrics.privacy import match_and_score
from medpfl.models.registry import build_model

SIZE, K = 16, 4


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """Three real 3 x 16 x 16 images: disjoint crops of scikit-image's fundus photograph."""
    retina = data.retina().astype(np.float32) / 255.0
    boxes = [(600, 600), (200, 900), (900, 300)]
    return torch.stack([to_tensor(retina[r : r + 400, c : c + 400], SIZE, 3) for r, c in boxes])


def observe(name: str, images: torch.Tensor, labels: torch.Tensor, norm: str = "group", grant: bool = True):
    """Payload and update of V victims (images V x B x C x H x W) sharing one freshly built model."""
    model = build_model(name, K, 3, SIZE, norm=norm)
    params = model_params(model, images.shape[0])
    gradients = site_gradients(model, params, images, labels, K)
    payload = ServerPayload(model, params, K, (3, SIZE, SIZE))
    return payload, ObservedUpdate(gradients, images.shape[1], labels=labels if grant else None)


def test_defaults_are_the_papers() -> None:
    s = InvertingGradientsSettings()
    assert (s.steps, s.restarts, s.lr, s.signed, s.tv_weight, s.top_layers) == (24000, 8, 0.1, True, 1e-6, 10)
    assert s.decay_at == (3 / 8, 5 / 8, 7 / 8) and s.boxed and s.median_filter
    attack = invgrad(steps=800, tv_weight=1e-2)
    assert attack.name == "invgrad" and attack.config()["tv_weight"] == 1e-2
    assert [attack.step_size(i) for i in (0, 299, 300, 499, 500, 700, 799)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001])
    with pytest.raises(MedPFLError, match="no setting 'stepz'"):
        invgrad(stepz=3)


def test_median_filter_removes_salt_and_keeps_flat() -> None:
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert torch.equal(median_filter(flat), flat)
    salted = flat.clone()
    salted[0, 1, 4, 4] = 1.0
    assert torch.allclose(median_filter(salted), flat)


def test_recovers_real_images_with_granted_labels(crops: torch.Tensor) -> None:
    originals = crops[:2, None]
    payload, update = observe("lenet-dlg", originals, torch.tensor([[1], [2]]))
    rec = invgrad(steps=300, restarts=1).reconstruct(payload, update, torch.Generator().manual_seed(0))
    got = ssim(rec.images[:, 0], originals[:, 0])
    unrelated = ssim(crops[2:3].expand(2, -1, -1, -1), originals[:, 0])
    noise = ssim(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)), originals[:, 0])
    assert (got > unrelated + 0.1).all() and (got > noise + 0.4).all(), (got, unrelated, noise)
    assert torch.equal(rec.labels, update.labels) and not rec.diverged.any()
    assert rec.evaluations.tolist() == [301, 301]  # 300 steps plus scoring the final iterate


def test_restart_choice_is_the_lowest_attacker_objective(crops: torch.Tensor) -> None:
    payload, update = observe("lenet-dlg", crops[:2, None], torch.tensor([[0], [3]]))
    rec = invgrad(steps=20, restarts=3).reconstruct(payload, update, torch.Generator().manual_seed(0))
    per_candidate = rec.extra["candidate_objective"]
    assert per_candidate.shape == (2, 3) and torch.isfinite(per_candidate).all()
    assert torch.equal(rec.objective, per_candidate.min(1).values)
    assert torch.equal(rec.extra["chosen_restart"], per_candidate.argmin(1))
    assert rec.evaluations.tolist() == [63, 63]


def test_chunks_give_the_same_answer(crops: torch.Tensor) -> None:
    payload, update = observe("lenet-dlg", crops[:2, None], torch.tensor([[0], [3]]))
    runs = [invgrad(steps=10, restarts=2, candidates_per_batch=c).reconstruct(
        payload, update, torch.Generator().manual_seed(4)) for c in (None, 2, 1)]
    for other in runs[1:]:
        assert torch.allclose(other.images, runs[0].images, atol=1e-5)
        assert torch.allclose(other.extra["candidate_objective"], runs[0].extra["candidate_objective"], atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_batch_of_two_with_recovered_labels(crops: torch.Tensor, norm: str) -> None:
    images = torch.stack([crops[:2], crops[1:]])  # V=2 victims, B=2 images each
    labels = torch.tensor([[0, 2], [1, 1]])
    payload, update = observe("convnet", images, labels, norm=norm, grant=False)
    rec = invgrad(steps=5, restarts=2).reconstruct(payload, update, torch.Generator().manual_seed(0))
    assert rec.images.shape == (2, 2, 3, SIZE, SIZE) and rec.labels.shape == (2, 2)
    # The labels of each batch, repeated one included, read off the update (order within a batch is lost).
    assert [sorted(row) for row in rec.labels.tolist()] == [[0, 2], [1, 1]]
    assert rec.images.min() >= 0 and rec.images.max() <= 1
    assert rec.seconds > 0 and not rec.diverged.any()


def test_resnet18_batchnorm_runs_under_vmap(crops: torch.Tensor) -> None:
    payload, update = observe("resnet18", crops[:2, None], torch.tensor([[1], [3]]), norm="batch")
    rec = invgrad(steps=1, restarts=1).reconstruct(payload, update, torch.Generator().manual_seed(0))
    assert rec.images.shape == (2, 1, 3, SIZE, SIZE) and torch.isfinite(rec.objective).all()


def test_same_seed_same_output(crops: torch.Tensor) -> None:
    payload, update = observe("lenet-dlg", crops[:1, None], torch.tensor([[2]]))
    attack = InvertingGradients(steps=15, restarts=2)
    a, b = (attack.reconstruct(payload, update, torch.Generator().manual_seed(7)) for _ in range(2))
    c = attack.reconstruct(payload, update, torch.Generator().manual_seed(8))
    assert torch.equal(a.images, b.images) and torch.equal(a.objective, b.objective)
    assert not torch.equal(a.images, c.images)


def test_diverged_candidates_are_never_chosen(crops: torch.Tensor) -> None:
    payload, update = observe("lenet-dlg", crops[:2, None], torch.tensor([[0], [1]]))
    # Victim 0's observed gradient is NaN: all its restarts diverge; victim 1 is untouched.
    update.gradients = {n: g.clone() for n, g in update.gradients.items()}
    for g in update.gradients.values():
        g[0] = float("nan")
    rec = invgrad(steps=5, restarts=2, top_layers=None).reconstruct(payload, update, torch.Generator().manual_seed(0))
    assert rec.diverged.tolist() == [True, False]
    assert rec.images.isfinite().all() and rec.images.min() >= 0 and rec.images.max() <= 1
    assert torch.isfinite(rec.objective[1])


def test_a_killed_run_continues_from_its_checkpoint_to_the_same_result(crops: torch.Tensor, tmp_path) -> None:
    """Killed mid-way (after its 9th save: the second of two chunks, two steps in), the attack started
    again on the same checkpoint ends exactly where an uninterrupted run ends, and counts the same work."""
    payload, update = observe("lenet-dlg", crops[:2, None], torch.tensor([[0], [3]]))
    attack = invgrad(steps=6, restarts=2, candidates_per_batch=2)  # two chunks: one victim's restarts each
    whole = attack.reconstruct(payload, update, torch.Generator().manual_seed(4))

    class Killed(Exception):
        """Stands for the crash: raised right after a save, as if the process had died there."""

    class Recorded(Checkpoint):
        """Saves at every step, remembers where, and is killed after `kill_after` saves."""

        def __init__(self, kill_after: int | None = None) -> None:
            super().__init__(tmp_path / "checkpoint.pt", "job", every_seconds=0)
            self.kill_after, self.at = kill_after, []

        def save(self, state):
            super().save(state)
            self.at.append((state["chunk"], state["progress"]["step"]))
            if len(self.at) == self.kill_after:
                raise Killed

    with pytest.raises(Killed):
        attack.reconstruct(payload, update, torch.Generator().manual_seed(4), Recorded(kill_after=9))
    again = Recorded()
    resumed = attack.reconstruct(payload, update, torch.Generator().manual_seed(4), again)
    assert again.at[0] == (1, 2)  # went on from the last save instead of starting over
    assert torch.equal(resumed.images, whole.images) and torch.equal(resumed.objective, whole.objective)
    assert torch.equal(resumed.evaluations, whole.evaluations)
    assert Checkpoint(again.path, "another job").load() is None  # never taken for another batch's state


def resnet_holding_statistics_of(images: torch.Tensor, num_classes: int) -> nn.Module:
    """ResNet-18 with BatchNorm, in eval mode, whose running statistics are `images`' own features' statistics:
    one training-mode pass at momentum 1 sets each layer's running mean to the batch's mean and its running
    variance to the batch's unbiased one, rescaled here to the biased variance the layer normalised with."""
    model = build_model("resnet18", num_classes, images.shape[1], images.shape[-1], norm="batch")
    per_channel: dict[nn.Module, int] = {}
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(lambda m, inputs, _: per_channel.__setitem__(m, inputs[0][:, 0].numel()))
             for m in layers]
    for m in layers:
        m.momentum = 1.0
    with torch.no_grad():
        model.train()(images)
    for m, n in per_channel.items():
        m.running_var.mul_((n - 1) / n)
    for hook in hooks:
        hook.remove()
    return model.eval()


def test_the_batchnorm_prior_vanishes_at_the_images_whose_statistics_the_model_holds(crops: torch.Tensor) -> None:
    """GradInversion's prior is ~0 at the images whose feature statistics torch's own BatchNorm stored, and at
    noise it is the sum, over the layers' inputs in the eval-mode pass, of the distances of their per-channel
    mean and biased variance (written out here) from the running ones. An unbiased variance fails the first."""
    images = crops[:2]
    model = resnet_holding_statistics_of(images, K)
    params = {n: p.detach() for n, p in model.named_parameters()}
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, inputs, _: seen.append((m, inputs[0])))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(noise)
    for hook in hooks:
        hook.remove()
    expected = 0.0
    for m, features in seen:
        mean = features.sum((0, 2, 3)) / features[:, 0].numel()
        var = ((features - mean[:, None, None]) ** 2).sum((0, 2, 3)) / features[:, 0].numel()
        expected += float((mean - m.running_mean).square().sum().sqrt() + (var - m.running_var).square().sum().sqrt())
    fmodel = functional_model(model, "eval")
    with torch.no_grad():
        at_noise = float(batchnorm_statistics_distance(fmodel, params, noise))
        at_truth = float(batchnorm_statistics_distance(fmodel, params, images))
    assert len(seen) == 20 and at_noise == pytest.approx(expected, rel=1e-5)
    assert at_truth < 1e-6 * at_noise


def test_the_batchnorm_prior_needs_batchnorm_on_running_statistics(crops: torch.Tensor) -> None:
    payload, update = observe("lenet-idlg", crops[None, :1], torch.tensor([[1]]), norm="none")
    with pytest.raises(MedPFLError, match="bn_prior=0.001 needs a model with BatchNorm run on its running"):
        invgrad(steps=1, restarts=1, bn_prior=1e-3).reconstruct(payload, update, torch.Generator().manual_seed(0))


def test_the_batchnorm_prior_raises_what_inverting_gradients_recovers(crops: torch.Tensor) -> None:
    """Two retina crops behind one eval-mode update of a ResNet-18 holding their own feature statistics: 20 steps
    with the prior at weight 1e-3 reach a mean SSIM of 0.26 where the same steps without it reach 0.16
    (benchmarks/batchnorm_prior.py; the embedded set's images: 0.23 against 0.07)."""
    images, labels = crops[:2], torch.tensor([0, 1])
    model = resnet_holding_statistics_of(images, K)
    params = model_params(model, 1)
    update = ObservedUpdate(site_gradients(model, params, images[None], labels[None], K, "eval"), 2,
                            labels=labels[None])
    payload = ServerPayload(model, params, K, (3, SIZE, SIZE), bn_mode="eval")
    mean_ssim = {}
    for weight in (0.0, 1e-3):
        result = invgrad(steps=20, restarts=1, bn_prior=weight).reconstruct(payload, update,
                                                                            torch.Generator().manual_seed(0))
        score = match_and_score(images, labels, result.images[0], result.labels[0])
        mean_ssim[weight] = sum(score.ssim) / len(score.ssim)
    assert mean_ssim[1e-3] > mean_ssim[0.0] + 0.05, mean_ssim
