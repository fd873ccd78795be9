"""Defenses on the Flower engine by Flower's own parts (LocalDpMod, fixedclipping_mod, its DP wrapper), checked
against the in-process engine's defended federation on the same seed, round and sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the Flower engine is an optional extra: pip install -e '.[flower]'")

from medpfl.defenses import parse_defense  # noqa: E402
from medpfl.defenses.training import DefendedFederation  # noqa: E402
from medpfl.errors import MedPFLError  # noqa: E402
from medpfl.defenses.flower import SERVER, flower_defense, flower_parts, numpy_seed  # noqa: E402
from medpfl.fl.flower.federation import FederationSpec, federation_data, global_model  # noqa: E402
from medpfl.fl.gradients import functional_model  # noqa: E402
from medpfl.fl.rounds import RoundHooks, SiteObservation  # noqa: E402

BASE = dict(sites=2, site_images=4, rounds=1, model="lenet-idlg", norm="none", image_size=16, seed=5,
            protocol="fedavg", local_epochs=1, local_batch=4, lr=0.05, momentum=0.0)


class Seen:
    """A curious server that keeps every update it receives."""

    def __init__(self):
        self.updates: dict[int, dict[str, torch.Tensor]] = {}

    def wants(self, round_index, site):
        return True

    def observe(self, seen: SiteObservation):
        self.updates[seen.facts.site] = seen.update


def in_process(spec: FederationSpec, defense: str):
    """The in-process engine's defended round 1 on the same sites: what each site sent, and the new weights."""
    data = federation_data(spec)
    model = functional_model(global_model(spec, data.num_classes))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = Seen()
    federation = DefendedFederation(parse_defense(defense), model, data.sites, data.num_classes, spec.training,
                                    spec.rounds, spec.seed, (seen,))
    return weights, seen.updates, federation.run_round(weights, 1).weights


def on_flower(spec: FederationSpec):
    from medpfl.fl.flower.simulation import run_simulation

    seen = Seen()
    parts = flower_parts(parse_defense(spec.defense), spec.seed, spec.sites)
    hooks = RoundHooks(observers=[seen], **({"aggregate": parts.aggregate} if parts.aggregate else {}))
    run = run_simulation(spec, hooks, client_mods=parts.client_mods, wrap_strategy=parts.wrap_strategy)
    return seen.updates, run.weights


def seeded_normal(seed: int, site: int, std: float, shapes) -> list[np.ndarray]:
    """Flower's draw (numpy's global generator, one array after another), seeded as the run seeds it."""
    np.random.seed(numpy_seed(seed, 1, site))
    return [np.random.normal(0, std, shape).astype(np.float32) for shape in shapes]


def test_local_dp_mod_clips_like_the_in_process_engine_and_adds_the_specs_gaussian_noise():
    spec = FederationSpec(**BASE, defense="clip:norm=0.05+gaussian:sigma=0.01")
    sent, clipped, _ = in_process(spec, "clip:norm=0.05")  # the same clipping, no noise
    flower, _ = on_flower(spec)
    assert sorted(flower) == [0, 1]
    for site, update in flower.items():
        noise = seeded_normal(spec.seed, site, 0.01, [t.shape for t in update.values()])
        for (name, u), z in zip(update.items(), noise):
            torch.testing.assert_close(u, clipped[site][name] + torch.from_numpy(z), atol=1e-5, rtol=0)
        drawn = torch.cat([(u - clipped[site][n]).flatten() for n, u in update.items()])
        assert drawn.std().item() == pytest.approx(0.01, rel=0.03)  # LocalDpMod's (eps, delta) gave sigma 0.01
        norm = torch.cat([clipped[site][n].flatten() for n in update]).norm().item()
        assert norm == pytest.approx(0.05, rel=1e-4)  # clipping acted


def test_client_level_dp_on_flower_matches_the_in_process_sites_and_flowers_server_noise():
    spec = FederationSpec(**BASE, defense="cdp:noise=0.5,clip=0.05")
    sent, clipped, _ = in_process(spec, "cdp:noise=0.5,clip=0.05")
    flower, weights = on_flower(spec)
    for site, update in flower.items():  # fixedclipping_mod: what the server sees is the in-process clipped update
        for name, u in update.items():
            torch.testing.assert_close(u, clipped[site][name], atol=1e-6, rtol=1e-5)
    # Flower's wrapper: noise of std noise x clip / sites on the new global weights, from the seeded stream.
    noise = seeded_normal(spec.seed, SERVER, 0.5 * 0.05 / 2, [w.shape for w in sent.values()])
    for (name, w), z in zip(sent.items(), noise):
        expected = w + (clipped[0][name] + clipped[1][name]) / 2 + torch.from_numpy(z)
        torch.testing.assert_close(weights[name], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("defense, protocol, words", [
    ("topk:prune=0.9", "fedavg", "'topk' runs on --engine inprocess"),
    ("dpsgd:epsilon=8", "fedavg", "'dpsgd' runs on --engine inprocess"),
    ("cdp:noise=1", "fedsgd", "only for FedAvg"),
    ("cdp:noise=1+clip:norm=1", "fedavg", "cdp runs alone"),
])
def test_what_flower_has_no_part_for_is_named_in_one_sentence(defense, protocol, words):
    with pytest.raises(MedPFLError, match=words):
        flower_defense(defense, protocol)


def test_a_privacy_audit_of_client_level_dp_on_flower_measures_what_the_in_process_engine_does(tmp_path):
    import json

    from medpfl.experiments.train_run import TrainRunConfig, run_training

    settings = dict(model="lenet-idlg", norm="none", image_size=16, sites=2, site_images=8, rounds=2, local_epochs=1,
                    local_batch=8, defense="cdp:noise=0.05", audit_canaries=200, seed=5)
    audits, scores = {}, {}
    for engine in ("flower", "inprocess"):
        audits[engine] = run_training(TrainRunConfig(**settings, engine=engine), tmp_path / engine)["dp_audit"]
        scores[engine] = json.loads((tmp_path / engine / "dp_audit.json").read_text())
    assert audits["flower"]["level"] == "client" and audits["flower"]["included"] == audits["inprocess"]["included"]
    # The engines differ only in the server's noise draws (numpy's on Flower, torch's in process; std 0.05 x clip /
    # sites per entry), so each canary's cosine with the model change moves by about that noise, no more.
    for side in ("scores_in", "scores_out"):
        np.testing.assert_allclose(scores["flower"][side], scores["inprocess"][side], rtol=0, atol=0.03)
    assert np.mean(scores["flower"]["scores_in"]) > 0.05 > abs(np.mean(scores["flower"]["scores_out"]))
    for key in ("epsilon_lower", "epsilon_upper", "correct", "guesses"):
        assert audits["flower"][key] == audits["inprocess"][key]


@pytest.mark.parametrize("defense", ["none", "clip:norm=1"])
def test_an_audit_on_flower_without_client_level_dp_is_refused_naming_the_option(tmp_path, defense):
    from medpfl.experiments.train_run import TrainRunConfig, run_training

    with pytest.raises(MedPFLError, match="--audit-dp on --engine flower audits client-level DP"):
        run_training(TrainRunConfig(engine="flower", defense=defense, audit_canaries=10), tmp_path / "run")
    assert not (tmp_path / "run").exists()
