"""The in-process engine: vectorised or threaded sites agree with sites trained one at a time, and hooks see what a
server sees."""

from __future__ import annotations

import pytest
import torch

from medpfl.data import ImageDataset
from medpfl.data.embedded import embedded_source
from medpfl.defenses.dpsgd import dp_schedules
from medpfl.defenses.spec import parse_defense
from medpfl.defenses.training import DPSGDFederation
from medpfl.fl.aggregate import weighted_average
from medpfl.fl.gradients import functional_model
from medpfl.fl.local import LocalTraining
from medpfl.fl.rounds import RoundHooks, SiteObservation, site_update
from medpfl.fl.simulation import InProcessFederation
from medpfl.models.registry import build_model


@pytest.fixture(scope="module")
def setup():
    source = embedded_source()
    items = source.items[::40]  # 19 images, several classes
    ds = ImageDataset(source, items, size=16)
    x, y = ds.load_batch(range(len(items)))
    sites = [(x[0:6], y[0:6]), (x[6:12], y[6:12]), (x[12:17], y[12:17]), (x[17:19], y[17:19])]  # sizes 6, 6, 5, 2
    model = build_model("convnet", 6, 3, 16, norm="group", seed=0)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    return functional_model(model), sites, weights


@pytest.mark.parametrize("training", [LocalTraining("fedavg", epochs=2, batch_size=4, lr=0.05, momentum=0.9),
                                      LocalTraining("fedsgd", lr=0.1)])
def test_vectorised_round_equals_sites_trained_one_at_a_time(setup, training):
    model, sites, weights = setup
    engine = InProcessFederation(model, sites, 6, training, seed=7)
    assert sorted(map(len, engine.groups)) == [1, 1, 2]  # the two 6-image sites run together
    outcome = engine.run_round(weights, 3)
    alone = [site_update(model, weights, x, y, 6, training, 7, 3, s) for s, (x, y) in enumerate(sites)]
    mean = weighted_average({n: torch.stack([u[n] for u in alone]) for n in weights}, [6, 6, 5, 2])
    step = -training.lr if training.protocol == "fedsgd" else 1.0
    for name in weights:
        torch.testing.assert_close(outcome.weights[name], weights[name] + step * mean[name], atol=1e-6, rtol=1e-5)
    looped = InProcessFederation(model, sites, 6, training, seed=7, vectorise=False).run_round(weights, 3)
    assert outcome.update_norms == pytest.approx(looped.update_norms, rel=1e-5)
    assert outcome.n_images == [6, 6, 5, 2]


def test_rounds_are_deterministic_and_shuffles_change_with_the_round(setup):
    model, sites, weights = setup
    training = LocalTraining("fedavg", epochs=1, batch_size=2, lr=0.05)
    engine = InProcessFederation(model, sites, 6, training, seed=1)
    first, again = engine.run_round(weights, 1), engine.run_round(weights, 1)
    other_round = engine.run_round(weights, 2)
    assert all(torch.equal(first.weights[n], again.weights[n]) for n in weights)
    assert not all(torch.equal(first.weights[n], other_round.weights[n]) for n in weights)


class Recorder:
    def __init__(self, rounds, sites):
        self.rounds, self.sites, self.seen = rounds, sites, []

    def wants(self, round_index, site):
        return round_index in self.rounds and site in self.sites

    def observe(self, seen: SiteObservation):
        self.seen.append(seen)


def test_observer_sees_payload_and_sent_update_and_transform_changes_what_is_sent(setup):
    model, sites, weights = setup
    training = LocalTraining("fedavg", epochs=1, batch_size=3, lr=0.05)
    recorder = Recorder({2}, {0, 3})
    halve = lambda update, facts: {n: u / 2 for n, u in update.items()}  # noqa: E731
    engine = InProcessFederation(model, sites, 6, training, seed=0, hooks=RoundHooks(halve, observers=[recorder]))
    engine.run_round(weights, 1)
    outcome = engine.run_round(weights, 2)
    assert [(s.facts.round, s.facts.site, s.facts.n_images) for s in recorder.seen] == [(2, 0, 6), (2, 3, 2)]
    seen = recorder.seen[1]
    assert seen.facts.training == training and all(torch.equal(seen.weights[n], weights[n]) for n in weights)
    raw = site_update(model, weights, *sites[3], 6, training, 0, 2, 3)
    for name in weights:
        torch.testing.assert_close(seen.update[name], raw[name] / 2, atol=1e-7, rtol=1e-5)
    plain = InProcessFederation(model, sites, 6, training, seed=0).run_round(weights, 2)
    assert outcome.update_norms == pytest.approx([n / 2 for n in plain.update_norms], rel=1e-5)


@pytest.mark.parametrize("defense", ["none", "dpsgd:noise=1.0,clip=1.0"])
def test_sites_trained_side_by_side_on_threads_equal_one_site_at_a_time_on_one_thread(setup, defense):
    """A site's arithmetic on a CPU does not depend on how many sites train at once: each thread has its own
    model (one module shared by threads mixes their parameters) and one torch thread, as a Flower client."""
    model, sites, weights = setup
    training = LocalTraining("fedavg", epochs=1, batch_size=4, lr=0.05, momentum=0.9)
    chain = parse_defense(defense)
    model = model if chain.local is None else functional_model(build_model("lenet-idlg", 6, 3, 16, seed=0))
    weights = {n: p.detach() for n, p in model.named_parameters()}

    def engine(workers):
        if chain.local is None:
            return InProcessFederation(model, sites, 6, training, seed=5, vectorise=False, workers=workers)
        dp = chain.local.for_sites(dp_schedules([len(y) for _, y in sites], training, 1))
        return DPSGDFederation(model, sites, 6, training, 5, vectorise=False, dp=dp, workers=workers)

    threads = torch.get_num_threads()
    side_by_side = engine(4)
    assert side_by_side.workers == 4
    parallel = side_by_side.run_round(weights, 1)
    assert torch.get_num_threads() == threads  # the caller's setting is back
    torch.set_num_threads(1)
    try:
        one = engine(1)
        alone = [one._site_update(model, weights, 1, s) if chain.local else  # DP-SGD's steps, its noise streams
                 site_update(model, weights, *sites[s], 6, training, 5, 1, s) for s in range(len(sites))]
    finally:
        torch.set_num_threads(threads)
    mean = weighted_average({n: torch.stack([u[n] for u in alone]) for n in weights}, [6, 6, 5, 2])
    for name in weights:
        assert torch.equal(parallel.weights[name], weights[name] + mean[name]), name
