"""The Flower engine: a real simulation whose curious server sees the real replies and agrees with the math."""

from __future__ import annotations

import re
from functools import lru_cache

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower engine is an optional extra: pip install -e '.[flower]'")

from medpfl.attacks.labels import count_labels  # noqa: E402
from medpfl.attacks.threat import ObservedUpdate, ServerPayload  # noqa: E402
from medpfl.fl.aggregate import apply_update, weighted_average  # noqa: E402
from medpfl.fl.flower.federation import FederationSpec, federation_data, global_model  # noqa: E402
from medpfl.fl.gradients import functional_model  # noqa: E402
from medpfl.fl.rounds import RoundHooks, SiteObservation, site_update  # noqa: E402

from held_out import accuracy_of  # noqa: E402

# Several local steps with momentum, so the site's image order and optimiser state must match too.
SPEC = FederationSpec(sites=2, site_images=6, rounds=2, model="convnet", norm="group", image_size=16, seed=3,
                      protocol="fedavg", local_epochs=2, local_batch=4, lr=0.05, momentum=0.5)


@lru_cache(maxsize=1)
def direct_federation(spec: FederationSpec) -> list[dict[str, torch.Tensor]]:
    """Global weights before and after each round, from the engines' shared pieces called here, no Flower."""
    data = federation_data(spec)
    model = functional_model(global_model(spec, data.num_classes))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = [weights]
    for r in range(1, spec.rounds + 1):
        updates = [site_update(model, weights, x, y, data.num_classes, spec.training, spec.seed, r, s)
                   for s, (x, y) in enumerate(data.sites)]
        stacked = {n: torch.stack([u[n] for u in updates]) for n in weights}
        aggregated = weighted_average(stacked, [len(y) for _, y in data.sites])
        weights = apply_update(weights, aggregated, spec.protocol, spec.lr)
        history.append(weights)
    return history


class LabelCountingServer:
    """A curious server that attacks round 1: label counts from each site's real update."""

    def __init__(self, model, num_classes):
        self.model, self.num_classes, self.seen, self.labels = model, num_classes, [], {}

    def wants(self, round_index, site):
        return round_index == 1

    def observe(self, seen: SiteObservation):
        self.seen.append(seen)
        payload = ServerPayload(self.model, {n: w[None] for n, w in seen.weights.items()}, self.num_classes,
                                (SPEC.channels, SPEC.image_size, SPEC.image_size))
        update = ObservedUpdate({n: -u[None] for n, u in seen.update.items()}, seen.facts.n_images)
        self.labels[seen.facts.site] = count_labels(update, payload)[0]


@pytest.fixture(scope="module")
def simulated():
    from medpfl.fl.flower.simulation import run_simulation

    data = federation_data(SPEC)
    server = LabelCountingServer(functional_model(global_model(SPEC, data.num_classes)), data.num_classes)
    return run_simulation(SPEC, RoundHooks(observers=[server])), server


def test_flower_simulation_matches_the_direct_computation(simulated):
    result, _ = simulated
    expected = direct_federation(SPEC)[-1]
    assert set(result.weights) == set(expected)
    for name in expected:
        torch.testing.assert_close(result.weights[name], expected[name], atol=1e-6, rtol=1e-5)
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert all(r["n_images"] == [6, 6] for r in result.rounds)
    # Each round's accuracy is that round's global model's on the held-out images, by a plain forward pass.
    data = federation_data(SPEC)
    for r, weights in zip(result.rounds, direct_federation(SPEC)[1:]):
        net = global_model(SPEC, data.num_classes)
        assert r["accuracy"] == pytest.approx(accuracy_of(net, weights, *data.test), abs=1e-12)


def test_auditor_receives_each_sites_real_reply_at_the_chosen_round(simulated):
    _, server = simulated
    data = federation_data(SPEC)
    initial = direct_federation(SPEC)[0]
    assert [(o.facts.round, o.facts.site) for o in server.seen] == [(1, 0), (1, 1)]  # round 2 was not audited
    fmodel = functional_model(global_model(SPEC, data.num_classes))
    for seen in server.seen:
        x, y = data.sites[seen.facts.site]
        sent = site_update(fmodel, initial, x, y, data.num_classes, SPEC.training, SPEC.seed, 1, seen.facts.site)
        assert seen.facts.n_images == len(y) == SPEC.site_images and seen.facts.training == SPEC.training
        for name in sent:
            torch.testing.assert_close(seen.weights[name], initial[name])
            torch.testing.assert_close(seen.update[name], sent[name])
        assert server.labels[seen.facts.site].shape == (len(y),)  # the attack ran on this reply


def test_local_deployment_with_tls_and_authenticated_sites_trains_like_the_simulation(tmp_path):
    """A SuperLink and two SuperNodes as separate processes on 127.0.0.1, TLS and node authentication on."""
    from medpfl.fl.flower.deploy import run_local_deployment

    out = run_local_deployment(SPEC, tmp_path / "run", audit_rounds=[1], timeout=420)
    assert "https://127.0.0.1" in (out / "deployment" / "superlink.log").read_text()
    assert sorted(p.name for p in (out / "observed").iterdir()) == ["round0001-site000.pt", "round0001-site001.pt"]
    final = torch.load(out / "global_model.pt", weights_only=True)
    expected = direct_federation(SPEC)[-1]
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], atol=1e-6, rtol=1e-5)
    observed = torch.load(out / "observed" / "round0001-site001.pt", weights_only=True)
    assert observed["n_images"] == SPEC.site_images and observed["round"] == 1 and observed["site"] == 1
    lines = (out / "rounds.jsonl").read_text().splitlines()
    assert len(lines) == SPEC.rounds


def test_secure_aggregation_leaves_the_server_only_the_sites_mean():
    """SecAgg+ over K = 2 sites: the auditor gets one update per round, the mean, never a site's own."""
    from medpfl.fl.flower.federation import AGGREGATE
    from medpfl.fl.flower.simulation import run_simulation

    class Recorder:
        def __init__(self):
            self.seen: list[SiteObservation] = []

        def wants(self, round_index, site):
            return True

        def observe(self, seen):
            self.seen.append(seen)

    recorder = Recorder()
    result = run_simulation(SPEC, RoundHooks(observers=[recorder]), secure_aggregation=True)
    assert [(o.facts.round, o.facts.site, o.facts.n_images) for o in recorder.seen] == [(1, AGGREGATE, 12),
                                                                                        (2, AGGREGATE, 12)]
    data = federation_data(SPEC)
    model = functional_model(global_model(SPEC, data.num_classes))
    initial = direct_federation(SPEC)[0]
    sites = [site_update(model, initial, x, y, data.num_classes, SPEC.training, SPEC.seed, 1, s)
             for s, (x, y) in enumerate(data.sites)]
    mean = weighted_average({n: torch.stack([u[n] for u in sites]) for n in initial}, [6, 6])
    observed = recorder.seen[0].update
    for name in initial:  # the protocol quantizes to 2**22 levels over +-8: ~4e-6 per entry
        torch.testing.assert_close(observed[name], mean[name], atol=5e-5, rtol=0)
    farthest = max((observed[n] - sites[0][n]).abs().max().item() for n in initial)
    assert farthest > 1e-3  # what the server holds is not site 0's update
    expected = direct_federation(SPEC)[-1]
    for name in expected:
        torch.testing.assert_close(result.weights[name], expected[name], atol=2e-4, rtol=0)


def test_deployment_refuses_a_site_whose_key_was_never_registered(tmp_path):
    from medpfl.fl.flower.deploy import LocalDeployment

    with LocalDeployment(tmp_path, sites=0) as deployment:
        intruder = deployment.start_supernode(0, register=False, max_retries=1)
        assert intruder.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in (tmp_path / "supernode0.log").read_text()


def test_train_on_flower_with_secagg_attacks_the_aggregate_of_both_sites_images(tmp_path):
    """medpfl train --engine flower --defense secagg:k=2: the attack takes the one update SecAgg+ leaves the
    server, as an update of both sites' images, and is scored against both."""
    import json

    from medpfl.experiments.train_run import TrainRunConfig, run_training
    from medpfl.fl.flower.federation import AGGREGATE

    config = TrainRunConfig(engine="flower", defense="secagg:k=2", sites=2, site_images=1, rounds=1,
                            model="lenet-idlg", protocol="fedsgd", lr=0.1, image_size=16, attack="idlg",
                            attack_rounds=[1], attack_settings={"steps": 2, "restarts": 0})
    run_training(config, tmp_path)
    (attacked,) = [json.loads(line) for line in (tmp_path / "attacks.jsonl").read_text().splitlines()]
    behind = federation_data(FederationSpec.of(config)).site_items
    assert attacked["site"] == AGGREGATE and attacked["observed"] == "aggregate"
    assert sorted(attacked["items"]) == sorted(behind[0] + behind[1]) and len(attacked["ssim"]) == 2
    (round_line,) = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert "update_norms" not in round_line  # under SecAgg+ the server never holds one site's update
    # The report shows the aggregate's reconstructions and says what the server faced: 2 images, all sites.
    from medpfl.report import build_report

    html = build_report(tmp_path).read_text()
    assert html.count("reconstruction of ") >= 2 and 'class="missing"' not in html
    assert re.search(r"<td>lenet-idlg</td><td class=num>2</td>.*the secure aggregate of all sites attacked", html)
