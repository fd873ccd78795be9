"""`medpfl train`: a run directory that resumes after a kill, attacks at chosen rounds, and one-sentence errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medpfl.errors import MedPFLError
from medpfl.experiments.train_run import TrainRunConfig, parse_int_list, run_training
from medpfl.models.registry import build_model

from killing import kill_after_lines, medpfl

# Small and fast: 16 px, 2 sites, one local epoch of big batches; an attack of 2 L-BFGS steps on 1 image.
TINY = ["--image-size", "16", "--sites", "2", "--rounds", "4", "--local-epochs", "1", "--local-batch", "64",
        "--attack", "idlg", "--attack-rounds", "1,3", "--attack-sites", "0,1", "--attack-batch", "1",
        "--steps", "2", "--set", "restarts=0", "--quiet"]
TIMINGS = {"seconds", "attack_seconds"}


def _train(out: Path, *extra: str) -> subprocess.Popen:
    return medpfl("train", *TINY, "--out", str(out), *extra)


def _lines(path: Path, drop=()) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def test_killed_run_resumes_from_the_last_finished_round_without_losing_or_repeating_results(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _train(whole)
    victim = _train(killed)
    kill_after_lines(victim, killed / "rounds.jsonl", 2)
    assert reference.wait() == 0, reference.stderr.read()
    finished = len((killed / "rounds.jsonl").read_text().splitlines())
    assert 2 <= finished < 4
    resumed = _train(killed)
    assert resumed.wait() == 0, resumed.stderr.read()
    assert _lines(killed / "rounds.jsonl", TIMINGS) == _lines(whole / "rounds.jsonl", TIMINGS)
    assert [r["round"] for r in _lines(killed / "rounds.jsonl")] == [1, 2, 3, 4]
    assert _lines(killed / "attacks.jsonl", TIMINGS) == _lines(whole / "attacks.jsonl", TIMINGS)
    assert [(a["round"], a["site"]) for a in _lines(killed / "attacks.jsonl")] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert (killed / "attacks" / "round0003-site001-0.png").exists()
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"  # --device auto, the default
    assert json.loads((killed / "federation.json").read_text())["device_used"].startswith(expected_device)
    state = torch.load(killed / "model.pt", weights_only=True)
    reference_state = torch.load(whole / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], reference_state[k]) for k in reference_state)
    model = build_model("convnet", 6, 3, 16, norm="group")
    model.load_state_dict(state)  # the architecture `medpfl attack --model-state` rebuilds


def test_a_fedavg_round_of_one_local_step_is_attacked_as_the_gradient_it_is(tmp_path):
    """FedSGD and one-step FedAvg send the same information at round 1 (same weights, same images)."""
    common = dict(image_size=16, sites=2, rounds=1, local_epochs=1, local_batch=64, attack="idlg", attack_rounds=[1],
                  attack_sites=[0], attack_batch=2, attack_settings={"steps": 2, "restarts": 0})
    sgd = run_training(TrainRunConfig(protocol="fedsgd", **common), tmp_path / "sgd")
    avg = run_training(TrainRunConfig(protocol="fedavg", lr=0.1, **common), tmp_path / "avg")
    a, b = _lines(tmp_path / "sgd" / "attacks.jsonl")[0], _lines(tmp_path / "avg" / "attacks.jsonl")[0]
    assert a["items"] == b["items"] and a["recovered_labels"] == b["recovered_labels"]
    assert a["ssim"] == pytest.approx(b["ssim"], abs=1e-3)
    assert sgd["chance"]["balanced_accuracy"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("changes, words", [
    (dict(attack="idlg", attack_rounds=[1], attack_sites=[0], local_epochs=2), "needs the update-inversion attack"),
    (dict(attack="idlg", attack_rounds=[1], attack_sites=[0], local_epochs=1), "over 271 images is several steps"),
    (dict(attack="idlg", attack_rounds=[9], attack_sites=[0]), "--attack-rounds must list rounds between 1 and 2"),
    (dict(attack="idlg", attack_rounds=[1], attack_sites=[5]), "--attack-sites must list sites between 0 and 1"),
    (dict(partition="by:scanner"), "--partition by:scanner names a column"),
    (dict(sites=1000), "--sites 1000 is more than"),
    (dict(engine="warp"), "--engine must be one of"),
])
def test_bad_settings_are_refused_in_one_sentence(tmp_path, changes, words):
    config = TrainRunConfig(**{**dict(sites=2, rounds=2, image_size=16), **changes})
    with pytest.raises(MedPFLError, match=words):
        run_training(config, tmp_path / "run")
    assert not (tmp_path / "run" / "rounds.jsonl").exists()


def test_flower_engine_without_the_flower_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)
    monkeypatch.setitem(sys.modules, "flwr.serverapp", None)
    with pytest.raises(MedPFLError, match=r"pip install -e '\.\[flower\]'"):
        run_training(TrainRunConfig(sites=2, rounds=1, image_size=16, engine="flower"), tmp_path / "run")


def test_resuming_with_other_settings_is_refused(tmp_path):
    run_training(TrainRunConfig(sites=2, rounds=1, image_size=16, local_batch=64, local_epochs=1), tmp_path / "run")
    with pytest.raises(MedPFLError, match="other settings \\(lr\\)"):
        run_training(TrainRunConfig(sites=2, rounds=1, image_size=16, local_batch=64, local_epochs=1, lr=0.2),
                     tmp_path / "run")


def test_round_and_site_lists():
    assert parse_int_list("1-3,8, 2", "--attack-rounds") == [1, 2, 3, 8]
    with pytest.raises(MedPFLError, match="--attack-sites 'a' is not a list"):
        parse_int_list("a", "--attack-sites")


def test_flower_engine_records_the_same_rounds_as_the_in_process_engine(tmp_path):
    pytest.importorskip("medpfl.fl.flower.simulation")
    config = dict(image_size=16, sites=2, rounds=1, local_epochs=1, local_batch=64)
    run_training(TrainRunConfig(engine="inprocess", **config), tmp_path / "in")
    run_training(TrainRunConfig(engine="flower", **config), tmp_path / "fl")
    # The in-process engine runs sites through vmap, whose kernels round differently in the last bits.
    flower, inprocess = (_lines(tmp_path / name / "rounds.jsonl", TIMINGS) for name in ("fl", "in"))
    assert [sorted(line) for line in flower] == [sorted(line) for line in inprocess]
    for ours, theirs in zip(flower, inprocess):
        for key, value in ours.items():
            assert value == pytest.approx(theirs[key], rel=1e-6), key
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("in", "fl"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_unknown_attack_settings_are_refused_before_anything_is_written(tmp_path):
    config = TrainRunConfig(sites=2, rounds=1, attack="idlg", attack_rounds=[1], attack_sites=[0],
                            attack_settings={"stepz": 3})
    with pytest.raises(MedPFLError, match="has no setting 'stepz'"):
        run_training(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_names_a_bad_partition_in_one_sentence(tmp_path, capsys):
    from medpfl.cli import main

    assert main(["train", "--partition", "random", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    message = capsys.readouterr().err
    assert "Unknown --partition 'random'; use iid, dirichlet:ALPHA" in message and "Traceback" not in message


def test_a_site_side_defense_changes_what_is_sent_and_trained(tmp_path):
    from medpfl.fl.rounds import RoundHooks

    config = TrainRunConfig(sites=2, rounds=1, image_size=16, local_batch=64, local_epochs=1)
    run_training(config, tmp_path / "plain")
    halve = RoundHooks(site_transform=lambda update, facts: {n: u / 2 for n, u in update.items()})
    run_training(config, tmp_path / "halved", defenses=halve)
    plain, halved = _lines(tmp_path / "plain" / "rounds.jsonl")[0], _lines(tmp_path / "halved" / "rounds.jsonl")[0]
    assert halved["update_norms"] == pytest.approx([n / 2 for n in plain["update_norms"]], rel=1e-5)


def test_train_with_dpsgd_records_every_sites_own_epsilon_and_the_worst_stays_within_target(tmp_path):
    from opacus.accountants import RDPAccountant

    config = TrainRunConfig(sites=3, partition="dirichlet:0.3", rounds=2, image_size=16, local_batch=64,
                            local_epochs=1)
    run_training(config, tmp_path / "plain")
    defended = TrainRunConfig(**{**config.__dict__, "defense": "dpsgd:epsilon=8"})
    summary = run_training(defended, tmp_path / "dp")
    plain, dp = _lines(tmp_path / "plain" / "rounds.jsonl"), _lines(tmp_path / "dp" / "rounds.jsonl")
    assert json.loads((tmp_path / "dp" / "config.json").read_text())["config"]["defense"] == "dpsgd:epsilon=8"
    assert "epsilon" not in plain[0] and dp[0]["update_norms"] != pytest.approx(plain[0]["update_norms"], rel=1e-3)
    # Each site's own schedule, from its image count alone: rate 64/n, ceil(n/64) noisy steps a round.
    n_images = json.loads((tmp_path / "dp" / "federation.json").read_text())["n_images"]
    assert len(set(n_images)) == 3  # unequal sites, or the test could not tell one site's epsilon from another's
    for r, line in enumerate(dp, start=1):
        expected = []
        for n in n_images:
            accountant = RDPAccountant()
            accountant.history = [(line["noise_multiplier"], min(1.0, 64 / n), r * -(-n // 64))]
            expected.append(accountant.get_epsilon(1e-5))
        assert line["epsilon_per_site"] == pytest.approx(expected, rel=0.02)
        assert line["epsilon"] == max(line["epsilon_per_site"])
    assert dp[0]["epsilon"] < dp[1]["epsilon"] <= 8.0 and dp[1]["epsilon"] == pytest.approx(8.0, rel=0.05)
    assert summary["epsilon"] == dp[1]["epsilon"] and summary["epsilon_per_site"] == dp[1]["epsilon_per_site"]
    from medpfl.report.build import build_report

    html = build_report(tmp_path / "dp").read_text()  # the report names the worst-off site and every site's epsilon
    worst = max(range(3), key=lambda s: expected[s])
    assert f"epsilon up to {expected[worst]:.2f}" in html and f"site {worst} with {n_images[worst]} images" in html
    assert all(f"site {s}: {e:.2f}" in html for s, e in enumerate(expected))
    with pytest.raises(MedPFLError, match="'dpsgd' runs on --engine inprocess"):
        run_training(TrainRunConfig(**{**defended.__dict__, "engine": "flower"}), tmp_path / "flower")


def test_the_curious_server_knows_the_defense_and_scores_the_strongest_attack_per_image(tmp_path):
    """Under top-k, `strongest` in federated training runs the attacks that know the sites' pruning, and each
    image's score is the best attack's (the auditor's worst case), with every attack's own SSIM beside it."""
    config = TrainRunConfig(protocol="fedsgd", lr=0.1, model="lenet-idlg", norm="none", sites=2, site_images=1,
                            rounds=1, image_size=16, defense="topk:prune=0.5", attack="strongest", attack_rounds=[1],
                            attack_sites=[0])
    run_training(config, tmp_path / "run")
    (attack,) = _lines(tmp_path / "run" / "attacks.jsonl")
    assert {"idlg", "sparse-l2", "sparse-cosine"} <= set(attack["ssim_by_attack"])  # the payload named top-k
    best = max(attack["ssim_by_attack"], key=lambda name: attack["ssim_by_attack"][name][0])
    assert attack["winner"] == [best] and attack["ssim"] == attack["ssim_by_attack"][best]
    assert attack["ssim"][0] >= attack["ssim_by_attack"]["idlg"][0]
