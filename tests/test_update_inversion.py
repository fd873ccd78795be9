"""Update inversion on FedAvg weight changes: the attacker's unrolled local training is the site's, labels
come back from the last layer's weight change, and real images come back from the update."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import vmap

from medpfl.attacks import ObservedUpdate, ServerPayload, build_attack
from medpfl.attacks.labels import as_mean_gradient, recover_labels, step_weights
from medpfl.attacks.update_inversion import UpdateInversion
from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.errors import MedPFLError
from medpfl.experiments.train_run import TrainRunConfig, run_training
from medpfl.fl.gradients import functional_model, model_params
from medpfl.fl.local import LocalTraining, local_update
from medpfl.fl.rounds import KeptObservations, RoundHooks, SiteRound, ordered, site_update
from medpfl.metrics.image import psnr, ssim
from medpfl.metrics.privacy import match_and_score
from medpfl.models.registry import build_model

SIZE = 16


@pytest.fixture(scope="module")
def real_images() -> tuple[torch.Tensor, torch.Tensor, int]:
    """12 real embedded images at 16 x 16 and their labels."""
    source = embedded_source()
    items = sample_items(source.items, 12, seed=1)
    x, y = ImageDataset(source, items, size=SIZE).load_batch(range(12))
    return x, y, len(source.classes)


def sites(model_name: str, images: torch.Tensor, labels: torch.Tensor, K: int, training: LocalTraining,
          grant: bool = False, seed: int = 0):
    """Payload and observed updates of V sites (images V x N x C x H x W) that share one global model."""
    model = build_model(model_name, K, 3, SIZE, norm="group", seed=seed)
    params = model_params(model, images.shape[0])
    fmodel = functional_model(model)
    updates = vmap(lambda p, x, y: local_update(fmodel, p, x, y, K, training))(params, images, labels)
    payload = ServerPayload(model, params, K, (3, SIZE, SIZE), local_training=training)
    return payload, ObservedUpdate(updates, images.shape[1], labels=labels if grant else None)


@pytest.mark.parametrize("training", [
    LocalTraining("fedavg", epochs=3, batch_size=2, lr=0.05),  # 2 batches, the last one smaller
    LocalTraining("fedavg", epochs=2, batch_size=1, lr=0.1, momentum=0.9),
    LocalTraining("fedsgd"),
], ids=["3-epochs-uneven-batches", "momentum", "fedsgd"])
def test_simulated_update_of_the_true_images_is_the_sites_update(real_images, training):
    """Given the true images and labels, the attacker's simulation reproduces what the site sent, so the
    cosine distance it minimises is zero there, and nowhere else it starts from."""
    x, y, K = real_images
    images, labels = x[:6].reshape(2, 3, 3, SIZE, SIZE), y[:6].reshape(2, 3)
    payload, update = sites("convnet", images, labels, K, training, grant=True)
    attack = build_attack("update-inversion", steps=0, restarts=1, median_filter=False, tv_weight=0.0)
    simulate = attack.simulated_update(payload, functional_model(payload.model))
    for v in range(2):
        simulated = simulate({n: p[v] for n, p in payload.params.items()}, images[v],
                             torch.nn.functional.one_hot(labels[v], K).float())
        for name, observed in update.gradients.items():
            torch.testing.assert_close(simulated[name], observed[v], atol=1e-6, rtol=1e-5)
    # The attack's own objective at the truth is zero; at a random start it is not.
    attack.initial_images = lambda n, shape, generator: images.reshape(-1, *shape)
    assert attack.reconstruct(payload, update, torch.Generator()).objective.abs().max() < 1e-5
    random_start = build_attack("update-inversion", steps=0, restarts=1, tv_weight=0.0)
    assert (random_start.reconstruct(payload, update, torch.Generator().manual_seed(0)).objective > 0.05).all()


def test_step_weights_add_up_what_momentum_carries_forward():
    assert step_weights(3, 0.0).tolist() == [1, 1, 1]
    assert step_weights(3, 0.5).tolist() == pytest.approx([1.75, 1.5, 1.0])


def test_labels_come_back_from_a_fedavg_weight_change(real_images):
    """Counts of repeated labels from several local steps, the sign flip of a weight change, iDLG's rule."""
    x, y, K = real_images
    images = x[:12].reshape(3, 4, 3, SIZE, SIZE)
    labels = torch.tensor([[0, 1, 1, 2], [3, 3, 5, 5], [2, 4, 4, 4]])
    truth = labels.sort(-1).values
    # One local step on all images is a FedSGD step scaled by -lr: the counts are exactly the gradient's.
    one_step, update = sites("convnet", images, labels, K, LocalTraining("fedavg", batch_size=4, lr=0.05))
    assert torch.equal(recover_labels(update, one_step), truth)
    # Read as if it were a gradient, the weight change points the other way and the counts are wrong.
    gradient_reading = recover_labels(update, ServerPayload(one_step.model, one_step.params, K, (3, SIZE, SIZE)))
    assert not torch.equal(gradient_reading, truth)
    # Two epochs of two batches: the softmax drifts between steps; averaging its start and end still counts.
    payload, update = sites("convnet", images, labels, K, LocalTraining("fedavg", epochs=2, batch_size=2, lr=0.01))
    hits = [match_and_score(images[v], labels[v], images[v], recovered).label_correct
            for v, recovered in enumerate(recover_labels(update, payload))]
    assert sum(map(sum, hits)) >= 10, hits  # of 12
    # One image per site, three epochs: iDLG's rule on the rescaled weight change.
    single, one_label = x[:3, None], torch.tensor([[1], [4], [5]])
    payload, update = sites("convnet", single, one_label, K, LocalTraining("fedavg", epochs=3, batch_size=1))
    assert torch.equal(recover_labels(update, payload), one_label)
    rescaled = as_mean_gradient(update, payload).gradients["fc.bias"]
    assert (rescaled.gather(1, one_label) < 0).all()


def test_reconstructs_real_images_from_several_local_steps(real_images):
    """Two sites, two images each, trained in two local steps of one image, labels granted: the
    reconstructions are far closer to the originals than the starting points."""
    x, y, K = real_images
    images, labels = x[:4].reshape(2, 2, 3, SIZE, SIZE), y[:4].reshape(2, 2)
    training = LocalTraining("fedavg", epochs=1, batch_size=1, lr=0.05)
    payload, update = sites("lenet-dlg", images, labels, K, training, grant=True)
    # Plain Adam with a stronger TV prior gets there in fewer steps than the paper's signed Adam.
    attack = build_attack("update-inversion", steps=150, restarts=1, tv_weight=1e-2, signed=False)
    assert isinstance(attack, UpdateInversion)
    start = attack.initial_images(4, (3, SIZE, SIZE), torch.Generator().manual_seed(0)).reshape(images.shape)
    rec = attack.reconstruct(payload, update, torch.Generator().manual_seed(0))
    assert not rec.diverged.any() and rec.images.shape == images.shape
    for v in range(2):
        got = match_and_score(images[v], labels[v], rec.images[v], rec.labels[v])
        before = match_and_score(images[v], labels[v], start[v], rec.labels[v])
        # Per original image: the reconstruction matched to it against the starting point matched to it.
        for after_ssim, before_ssim, after_psnr, before_psnr in zip(got.ssim, before.ssim, got.psnr, before.psnr):
            assert after_ssim > before_ssim + 0.3 and after_psnr > before_psnr + 4, (got, before)


def test_what_the_curious_server_observes_in_a_round_is_what_the_attack_simulates(real_images):
    """Sites of a federated round (their images in the round's seeded order) seen through the round's
    observer seam: the attacker's simulation, told the configured local training, reproduces every
    received update from the sites' images in the order they visited them."""
    x, y, K = real_images
    training = LocalTraining("fedavg", epochs=2, batch_size=2, lr=0.05)
    model = build_model("convnet", K, 3, SIZE, norm="group", seed=0)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    fmodel = functional_model(model)

    observer = KeptObservations()
    hooks = RoundHooks(observers=[observer])
    site_images = [(x[3 * s:3 * s + 3], y[3 * s:3 * s + 3]) for s in range(2)]
    for s, (images, labels) in enumerate(site_images):
        update = site_update(fmodel, weights, images, labels, K, training, seed=7, round_index=3, site=s)
        hooks.notify(SiteRound(3, s, 3, training, seed=7), weights, update)
    assert [seen.facts.training for seen in observer.seen] == [training, training]
    payload = ServerPayload(model, {n: torch.stack([o.weights[n] for o in observer.seen]) for n in weights}, K,
                            (3, SIZE, SIZE), local_training=observer.seen[0].facts.training)
    simulate = build_attack("update-inversion").simulated_update(payload, functional_model(model))
    for s, (images, labels) in enumerate(site_images):
        visited, visited_labels = ordered(images, labels, 7, 3, s)
        simulated = simulate(weights, visited, torch.nn.functional.one_hot(visited_labels, K).float())
        for name in weights:
            torch.testing.assert_close(simulated[name], observer.seen[s].update[name], atol=1e-6, rtol=1e-5)


def test_restarts_try_the_ways_labels_can_share_minibatches():
    """Labels come without the site's order; a FedAvg weight change depends on which labels shared a
    minibatch, so restarts try groupings (restart 0 the given order), and FedSGD needs none."""
    labels = torch.tensor([[0, 1, 2, 3]])
    model = build_model("lenet-idlg", 4, 3, SIZE)
    fedavg = ServerPayload(model, model_params(model), 4, (3, SIZE, SIZE),
                           local_training=LocalTraining("fedavg", batch_size=2))
    tried = build_attack("update-inversion").candidate_labels(labels, 12, fedavg, torch.Generator().manual_seed(0))
    assert torch.equal(tried[0, 0], labels[0]) and (tried.sort(-1).values == labels).all()
    pairings = {frozenset((frozenset(r[:2].tolist()), frozenset(r[2:].tolist()))) for r in tried[0]}
    assert len(pairings) == 3  # {01|23}, {02|13}, {03|12}
    fedsgd = ServerPayload(model, model_params(model), 4, (3, SIZE, SIZE))
    assert (build_attack("update-inversion").candidate_labels(labels, 5, fedsgd, torch.Generator()) == labels).all()


def test_medpfl_train_attacks_fedavg_rounds_with_update_inversion(tmp_path):
    """Federated training with two local epochs per round, the curious server inverting a probe update
    of site 0's first three images in rounds 1 and 2: a scored result per attacked round."""
    config = TrainRunConfig(model="lenet-idlg", image_size=16, sites=2, rounds=2, protocol="fedavg",
                            local_epochs=2, local_batch=64, lr=0.05, attack="update-inversion",
                            attack_rounds=[1, 2], attack_sites=[0], attack_batch=3,
                            attack_settings={"steps": 5, "restarts": 2})
    run_training(config, tmp_path / "run")
    attacks = [json.loads(line) for line in (tmp_path / "run" / "attacks.jsonl").read_text().splitlines()]
    assert [(a["round"], a["site"], a["observed"]) for a in attacks] == [(1, 0, "probe"), (2, 0, "probe")]
    for a in attacks:
        assert len(a["ssim"]) == len(a["recovered_labels"]) == 3 and not a["diverged"]
        assert 0 <= a["objective"] < 2 and a["evaluations"] == 2 * 6  # 2 restarts x (5 steps + scoring)


def test_the_strongest_attacker_on_several_local_steps_is_update_inversion_exactly(tmp_path):
    """Where a site's update is a weight change of several local steps no gradient attack applies: the strongest
    attacker runs the attack that unrolls local training (it was refused, leaving FedAvg's default unaudited)."""
    common = dict(model="lenet-idlg", image_size=16, sites=2, rounds=1, protocol="fedavg", local_epochs=2,
                  local_batch=2, lr=0.05, attack_rounds=[1], attack_sites=[0], attack_batch=3)
    alone = TrainRunConfig(**common, attack="update-inversion", attack_settings={"steps": 5, "restarts": 1})
    strongest = TrainRunConfig(**common, attack="strongest", attack_settings={"steps": 5, "restarts": 1})
    with pytest.raises(MedPFLError, match="update-inversion"):  # a gradient attack still may not take it
        run_training(TrainRunConfig(**common, attack="idlg"), tmp_path / "idlg")
    for config, name in ((alone, "alone"), (strongest, "strongest")):
        run_training(config, tmp_path / name)
    a, s = ([json.loads(line) for line in (tmp_path / name / "attacks.jsonl").read_text().splitlines()]
            for name in ("alone", "strongest"))
    assert len(a) == len(s) == 1 and s[0]["attacker_pick"] == "update-inversion"
    assert s[0]["ssim"] == a[0]["ssim"] and s[0]["recovered_labels"] == a[0]["recovered_labels"]
