"""The Flower engine: a real simulation whose curious server sees the real replies and agrees with the math."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from medpfl.errors import MedPFLError
from medpfl.fl.flower import INSTALL_HINT, require_flower
from medpfl.fl.local import LocalTraining

pytest.importorskip("flwr", reason="the Flower engine is an optional extra: pip install -e '.[flower]'")

from medpfl.attacks.labels import count_labels  # noqa: E402
from medpfl.attacks.threat import ObservedUpdate, ServerPayload  # noqa: E402
from medpfl.fl.flower.federation import (  # noqa: E402
    FederationSpec, aggregate, federation_data, global_model, site_order,
)
from medpfl.fl.gradients import functional_model  # noqa: E402
from medpfl.fl.local import local_update  # noqa: E402

# Several local steps with momentum, so the site's image order and optimiser state must match too.
SPEC = FederationSpec(sites=2, site_images=6, rounds=2, model="convnet", norm="group", image_size=16, seed=3,
                      training=LocalTraining("fedavg", epochs=2, batch_size=4, lr=0.05, momentum=0.5))


def direct_federation(spec: FederationSpec) -> list[dict[str, torch.Tensor]]:
    """Global weights after each round, computed here with the same local step and average, no Flower."""
    data = federation_data(spec)
    model = global_model(spec, data.num_classes)
    fmodel = functional_model(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = [weights]
    for r in range(1, spec.rounds + 1):
        updates, counts = [], []
        for s, (x, y) in enumerate(data.sites):
            order = torch.from_numpy(site_order(spec.seed, r, s, len(y)))
            updates.append(local_update(fmodel, weights, x[order], y[order], data.num_classes, spec.training))
            counts.append(len(y))
        weights = aggregate(weights, updates, counts, spec.training)
        history.append(weights)
    return history


@pytest.fixture(scope="module")
def simulated():
    from medpfl.fl.flower.simulation import run_simulation

    data = federation_data(SPEC)
    model = global_model(SPEC, data.num_classes)
    seen, attacked = [], {}

    def curious_server(reply):  # the auditor's seat: an attack runs on what the site really sent
        seen.append(reply)
        payload = ServerPayload(model, {n: w[None] for n, w in reply.weights.items()}, data.num_classes,
                                (SPEC.channels, SPEC.image_size, SPEC.image_size))
        observed = ObservedUpdate({n: -u[None] for n, u in reply.update.items()}, reply.num_examples)
        attacked[reply.site] = count_labels(observed, payload)[0]

    result = run_simulation(SPEC, observer=curious_server, audit_rounds=[1])
    return result, seen, attacked


def test_flower_simulation_matches_the_direct_computation(simulated):
    result, _, _ = simulated
    expected = direct_federation(SPEC)[-1]
    assert set(result.weights) == set(expected)
    for name in expected:
        torch.testing.assert_close(result.weights[name], expected[name], atol=1e-6, rtol=1e-5)
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result.rounds)


def test_auditor_receives_each_sites_real_reply_at_the_chosen_round(simulated):
    _, seen, attacked = simulated
    data = federation_data(SPEC)
    initial = direct_federation(SPEC)[0]
    assert [(r.round, r.site) for r in seen] == [(1, 0), (1, 1)]  # round 2 was not audited
    fmodel = functional_model(global_model(SPEC, data.num_classes))
    for reply in seen:
        x, y = data.sites[reply.site]
        order = torch.from_numpy(site_order(SPEC.seed, 1, reply.site, len(y)))
        sent = local_update(fmodel, initial, x[order], y[order], data.num_classes, SPEC.training)
        assert reply.num_examples == len(y) == SPEC.site_images
        for name in sent:
            torch.testing.assert_close(reply.weights[name], initial[name])
            torch.testing.assert_close(reply.update[name], sent[name])
        assert attacked[reply.site].shape == (len(y),)  # the attack ran on this reply


def test_missing_flower_is_one_sentence():
    code = ("import sys; sys.modules['flwr'] = None\n"
            "import medpfl.cli, medpfl.fl.flower as f\n"
            "try:\n    f.require_flower()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"MedPFLError {INSTALL_HINT}"
    require_flower()  # installed here: no error
    with pytest.raises(MedPFLError, match="--sites"):
        federation_data(FederationSpec(sites=10**6))


def test_local_deployment_with_tls_and_authenticated_sites_trains_like_the_simulation(tmp_path):
    """A SuperLink and two SuperNodes as separate processes on 127.0.0.1, TLS and node authentication on."""
    from medpfl.fl.flower.deploy import run_local_deployment

    out = run_local_deployment(SPEC, tmp_path / "run", audit_rounds=[1], timeout=420)
    assert "https://127.0.0.1" in (out / "deployment" / "superlink.log").read_text()
    assert sorted(p.name for p in (out / "observed").iterdir()) == ["round1-site0.pt", "round1-site1.pt"]
    final = torch.load(out / "global_model.pt", weights_only=True)
    expected = direct_federation(SPEC)[-1]
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], atol=1e-6, rtol=1e-5)
    observed = torch.load(out / "observed" / "round1-site1.pt", weights_only=True)
    assert observed["num_examples"] == SPEC.site_images and observed["round"] == 1
    lines = (out / "rounds.jsonl").read_text().splitlines()
    assert len(lines) == SPEC.rounds
