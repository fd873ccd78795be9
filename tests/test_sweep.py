"""`medpfl sweep`: defenses inside federated training, a grid that resumes after a kill, the trade-off files."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from medpfl.cli import main
from medpfl.defenses import epsilon_spent
from medpfl.experiments.sweep import SweepConfig, cell_name, run_cell
from medpfl.models.registry import build_model
from medpfl.seeds import model_seed
from medpfl.report.tradeoff import beats_chance, pareto_front, utility_at_chance

from held_out import utility_cell_accuracy

TINY = ["--attacks", "idlg", "--n-images", "1", "--image-size", "16", "--set", "idlg.steps=3",
        "--set", "idlg.restarts=0", "--rounds", "1", "--sites", "2", "--quiet"]


def test_defense_acts_inside_training_not_only_on_the_attackers_copy(tmp_path):
    sweep = SweepConfig(image_size=16, rounds=1, sites=2, site_images=2)
    plain = run_cell({"kind": "utility", "defense": "none", "seed": 0, "cell": "none"}, asdict(sweep), str(tmp_path))
    clipped = run_cell({"kind": "utility", "defense": "clip:norm=1e-6", "seed": 0, "cell": "clip"}, asdict(sweep),
                       str(tmp_path))
    start = build_model(sweep.model, 6, 3, 16, norm=sweep.norm, seed=model_seed(0)).state_dict()
    moved, held = (torch.load(tmp_path / "cells" / name / "model.pt", weights_only=True) for name in ("none", "clip"))
    change = lambda w: sum((w[n] - start[n]).pow(2).sum() for n in start).sqrt().item()  # noqa: E731
    assert change(moved) > 0.01  # an undefended round moves the global model
    assert change(held) <= 1e-6 + 1e-7  # each site's update clipped to 1e-6: the average moves at most that
    assert plain["accuracy_chance"] > 0 and "accuracy" in clipped


def test_privacy_attacks_the_same_defended_federation_whose_utility_is_reported(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", *TINY, "--rounds", "2", "--workers", "1", "--defenses", "none", "gaussian:sigma=0.01",
                 "--out", str(out)]) == 0
    # Two sites of one image, two FedSGD steps: no model learns, and the user is told its utility says nothing.
    assert "No federation of this sweep beats chance" in " ".join("".join(capsys.readouterr()).split())
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "No federation of this sweep beats chance" in page and "costs least in accuracy is not measured" in page
    for defense in ("none", "gaussian:sigma=0.01"):
        privacy, utility = (out / "cells" / cell_name(kind, defense, 0, attack)
                            for kind, attack in (("privacy", "idlg"), ("utility", None)))
        attacked_model = next(json.loads(line)["model"] for line in (out / "results.jsonl").read_text().splitlines()
                              if json.loads(line)["cell"] == privacy.name)
        assert attacked_model == json.loads((utility / "config.json").read_text())["config"]["model"]
        # The same noise draws: every site's update, as sent, had the same norm in both runs of the federation.
        norms = [[r["update_norms"] for r in map(json.loads, (d / "rounds.jsonl").read_text().splitlines())]
                 for d in (privacy, utility)]
        assert norms[0] == norms[1]
        attacked = [json.loads(line) for line in (privacy / "attacks.jsonl").read_text().splitlines()]
        assert {(a["round"], a["site"]) for a in attacked} == {(1, 0), (1, 1), (2, 0), (2, 1)}  # first, last round
    plain, defended = (json.loads((out / "cells" / cell_name("utility", d, 0) / "rounds.jsonl").read_text()
                                  .splitlines()[0]) for d in ("none", "gaussian:sigma=0.01"))
    assert plain["update_norms"] != defended["update_norms"]  # the noise is inside what the sites sent
    rows = list(csv.DictReader(open(out / "tradeoff.csv")))
    assert [r["defense"] for r in rows] == ["none", "gaussian:sigma=0.01"]
    assert all(r["model"] == r["trained_model"] == "lenet-idlg" for r in rows)
    assert json.loads((out / "config.json").read_text())["config"]["privacy"] == "federation"


def test_every_rate_of_a_sweep_comes_with_its_95_percent_interval_over_the_images_scored(tmp_path):
    from scipy.stats import binomtest

    from medpfl.report import build_report

    out = tmp_path / "sweep"
    assert main(["sweep", *TINY, "--rounds", "2", "--no-utility", "--workers", "1", "--defenses", "none",
                 "--out", str(out)]) == 0
    (row,) = csv.DictReader(open(out / "tradeoff.csv"))
    cell = out / "cells" / cell_name("privacy", "none", 0, "idlg")
    attacked = [json.loads(line) for line in (cell / "attacks.jsonl").read_text().splitlines()]
    ssims = [s for a in attacked for s in a["ssim"]]
    labels = [h for a in attacked for h in a["label_correct"]]
    assert int(row["asr_n"]) == int(row["label_accuracy_n"]) == len(ssims) == 4  # 2 sites x 1 image x 2 rounds
    for key, k in (("asr", sum(s >= 0.9 for s in ssims)), ("label_accuracy", sum(labels))):
        wilson = binomtest(k, len(ssims)).proportion_ci(confidence_level=0.95, method="wilson")
        assert (float(row[f"{key}_low"]), float(row[f"{key}_high"])) == pytest.approx((wilson.low, wilson.high))
    # `medpfl train`'s summary, per attacked update: the images behind that update alone.
    for a in json.loads((cell / "summary.json").read_text())["attacks"]:
        wilson = binomtest(round(a["asr"] * a["images"]), a["images"]).proportion_ci(method="wilson")
        assert (a["asr_n"], a["asr_high"]) == (1, pytest.approx(wilson.high))
    html = " ".join(build_report(out).read_text().split())
    assert f"[{float(row['asr_low']):.2f}-{float(row['asr_high']):.2f}]" in html and "95% interval" in html


def test_a_killed_sweep_finishes_its_grid_without_repeating_a_finished_cell(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", *TINY, "--no-utility", "--workers", "1", "--defenses", "none", "laplace:b=0.01,0.1",
            "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "medpfl.cli", *args], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (results.exists() and results.read_text().count("\n") >= 1):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = results.read_text().splitlines()
    assert 1 <= len(first) < 3
    assert main(args) == 0
    lines = results.read_text().splitlines()
    assert lines[:len(first)] == first  # finished cells kept as they were
    cells = [json.loads(line)["cell"] for line in lines]
    assert len(cells) == len(set(cells)) == 3
    rows = list(csv.DictReader(open(out / "tradeoff.csv")))
    assert [r["defense"] for r in rows] == ["none", "laplace:b=0.01", "laplace:b=0.1"]
    assert all(r["utility"] == "pending" for r in rows) and (out / "tradeoff.png").stat().st_size > 1000


def test_sweep_measures_utility_and_epsilon_per_defense_in_worker_processes(tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", *TINY, "--workers", "2", "--defenses", "none", "dpsgd:epsilon=8", "secagg:k=2",
                 "cdp:noise=2", "--out", str(out)]) == 0
    rows = {r["defense"].split(",")[0]: r for r in csv.DictReader(open(out / "tradeoff.csv"))}
    assert set(rows) == {"none", "dpsgd:epsilon=8", "secagg:k=2", "cdp:noise=2"}
    assert float(rows["cdp:noise=2"]["epsilon"]) == pytest.approx(epsilon_spent(2.0, 1.0, 1))  # one round
    assert all(r["utility"] == "measured" for r in rows.values())
    for defense in ("none", "dpsgd:epsilon=8", "cdp:noise=2"):  # the final model's accuracy on held-out images
        cell = out / "cells" / cell_name("utility", rows[defense]["defense"], 0)
        assert float(rows[defense]["accuracy"]) == pytest.approx(utility_cell_accuracy(cell, 2, 0, 16), abs=1e-12)
    assert float(rows["dpsgd:epsilon=8"]["epsilon"]) == pytest.approx(8, rel=0.05)
    per_site = [float(e) for e in rows["dpsgd:epsilon=8"]["epsilon_per_site"].split()]
    assert len(per_site) == 2 and max(per_site) == pytest.approx(float(rows["dpsgd:epsilon=8"]["epsilon"]), rel=1e-3)
    # Secure aggregation's row shows the undefended federation's utility. Its privacy cell trained the federation
    # again, through Flower's SecAgg+ (masked updates, quantized sums): it must reach the same model.
    secure = torch.load(out / "cells" / cell_name("privacy", "secagg:k=2", 0, "idlg") / "model.pt", weights_only=True)
    plain = torch.load(out / "cells" / cell_name("utility", "none", 0) / "model.pt", weights_only=True)
    assert max((secure[n] - plain[n]).abs().max().item() for n in plain) < 1e-4
    assert any((secure[n] != plain[n]).any() for n in plain)  # Flower's own arithmetic, not a copy
    assert rows["none"]["epsilon"] == ""
    utility = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "utility"]
    assert len(utility) == 3  # secure aggregation reuses the undefended federation


def test_utility_counts_as_informative_only_where_a_model_beats_chance_beyond_its_interval():
    from scipy.stats import binomtest

    def row(defense, correct, balanced=1 / 6):
        return {"defense": defense, "accuracy": correct / 185, "balanced_accuracy": balanced,
                "accuracy_chance": 40 / 185, "balanced_accuracy_chance": 1 / 6, "test_images": 185}

    # 50 of 185 right (0.270) tops the majority share (40, 0.216), but its 95% Wilson interval does not clear it.
    assert binomtest(50, 185).proportion_ci(method="wilson").low < 40 / 185
    assert binomtest(56, 185).proportion_ci(method="wilson").low > 40 / 185
    assert beats_chance(row("lucky", 50)) is False and beats_chance(row("learned", 56)) is True
    assert beats_chance(row("minority classes", 30, balanced=0.40)) is True  # below the majority share, yet learned
    warning = utility_at_chance([row("none", 50), row("topk:prune=0.9", 30)])
    assert warning.startswith("No federation of this sweep beats chance: the best test accuracy is 0.270 (none)")
    assert utility_at_chance([row("none", 56), row("topk:prune=0.9", 30)]) is None
    assert utility_at_chance([{"defense": "none", "accuracy": None}]) is None  # utility pending: nothing to say


def test_pareto_front_keeps_points_no_other_beats_on_both_axes():
    points = [(0.9, 0.8), (0.8, 0.1), (0.5, 0.0), (0.7, 0.5), (0.9, 0.9)]
    assert pareto_front(points) == [0, 1, 2]


def test_labels_of_nearby_points_take_separate_rows_and_distant_ones_stay_on_the_first():
    from medpfl.report.tradeoff import label_rows

    # Three defenses at ASR 0 and close accuracies would print their labels over each other; one far away would not.
    points = [(0.30, 0.0), (0.32, 0.0), (0.34, 0.0), (0.60, 0.0), (0.31, 1.0)]
    assert label_rows(points, x_span=0.3, y_span=1.0) == [0, 1, 2, 0, 0]


@pytest.mark.parametrize("name", ["paper-defense.yaml", "defense-sweep.yaml"])
def test_ready_configs_plan_their_grid(name):
    from medpfl.experiments.sweep import load_sweep_config, plan

    config = SweepConfig(**load_sweep_config(Path(__file__).parents[1] / "configs" / name))
    jobs = plan(config)
    privacy = [j for j in jobs if j["kind"] == "privacy"]
    assert len(privacy) == len(config.attacks) * len(config.chains())
    if name == "paper-defense.yaml":
        assert {"laplace:b=0.01", "laplace:b=0.005", "laplace:b=0.0033", "laplace:b=0.0025"} <= \
            {j["defense"] for j in privacy}


def test_a_config_with_an_unknown_key_is_refused_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("attacks: [idlg]\nnoise: 3\n")
    assert main(["sweep", "--config", str(bad), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "unknown key 'noise'" in capsys.readouterr().err


@pytest.mark.parametrize("changes, words", [
    ({"protocol": "fedavg", "local_epochs": 2}, "update-inversion"),  # several local steps: not a gradient
    ({"defenses": ["secagg:k=2"]}, "secagg:k=5"),  # SecAgg+ runs over all 5 sites of a round
    ({"privacy": "both"}, "--privacy must be one of"),
])
def test_a_federation_the_attacks_cannot_take_as_sent_is_refused_before_anything_runs(changes, words):
    from medpfl.errors import MedPFLError
    from medpfl.experiments.sweep import plan

    with pytest.raises(MedPFLError, match=words):
        plan(SweepConfig(**{"attacks": ["idlg"], **changes}))
    if "protocol" in changes:  # the attack that unrolls the sites' local training takes it
        assert plan(SweepConfig(**{"attacks": ["update-inversion"], **changes}))


def _audited_sweep(out: Path) -> dict[str, dict]:
    assert main(["sweep", *TINY, "--rounds", "2", "--workers", "1", "--defenses", "none", "dpsgd:epsilon=4",
                 "--audit-dp", "canaries=1000", "--out", str(out)]) == 0
    return {r["defense"].split(",")[0]: r for r in csv.DictReader(open(out / "tradeoff.csv"))}


def test_an_audited_sweep_sets_each_federations_measured_epsilon_beside_the_accountants(tmp_path, monkeypatch):
    rows = _audited_sweep(tmp_path / "honest")
    for defense, row in rows.items():  # each row's bound is its utility cell's own run, read from that run's folder
        cell = tmp_path / "honest" / "cells" / cell_name("utility", row["defense"], 0)
        audit = json.loads((cell / "summary.json").read_text())["dp_audit"]
        assert float(row["epsilon_measured"]) == audit["epsilon_lower"]
        assert row["guarantee_broken"] == str(audit["guarantee_broken"]) == "False"
        assert json.loads((cell / "config.json").read_text())["config"]["audit_canaries"] == 1000
    assert float(rows["none"]["epsilon_measured"]) > 2 and rows["none"]["epsilon"] == ""
    assert float(rows["dpsgd:epsilon=4"]["epsilon_measured"]) <= float(rows["dpsgd:epsilon=4"]["epsilon"])
    privacy = tmp_path / "honest" / "cells" / cell_name("privacy", rows["none"]["defense"], 0, "idlg")
    assert "audit_canaries" not in json.loads((privacy / "config.json").read_text())["config"]  # attacks see no canary
    # DP-SGD with its noise switched off while the accountant still counts it (the audit's own control).
    from medpfl.defenses import DPSGD
    from medpfl.experiments.privacy_audit import NoiselessDPSGD

    monkeypatch.setattr(DPSGD, "_noise", NoiselessDPSGD._noise)
    broken = _audited_sweep(tmp_path / "broken")["dpsgd:epsilon=4"]
    assert broken["epsilon"] == rows["dpsgd:epsilon=4"]["epsilon"]  # the accountant is none the wiser
    assert broken["guarantee_broken"] == "True" and float(broken["epsilon_measured"]) > float(broken["epsilon"])
    from medpfl.report import build_report

    warning = "The measured epsilon exceeds the accountant's for dpsgd:epsilon=4"
    assert warning in build_report(tmp_path / "broken").read_text()
    assert warning not in build_report(tmp_path / "honest").read_text()


def test_a_sweep_of_grayscale_images_runs_on_one_channel_when_told(tmp_path):
    """A user's 1-channel X-rays: `--channels 1` reaches every cell's federation and attack, as it does in
    `medpfl attack` and `medpfl train` (the sweep had no such option and fed them as 3 equal channels)."""
    from PIL import Image

    from medpfl.data import ImageDataset, sample_items
    from medpfl.data.embedded import embedded_source

    source = embedded_source()
    items = sample_items(source.items, 12, seed=5)  # two per class: one held out for testing
    data = ImageDataset(source, items, size=16, channels=1)
    for i, item in enumerate(items):
        (tmp_path / "xrays" / item.class_name).mkdir(parents=True, exist_ok=True)
        Image.fromarray((data.image(i)[0].numpy() * 255).round().astype("uint8"), mode="L").save(
            tmp_path / "xrays" / item.class_name / f"img{i}.png")
    out = tmp_path / "sweep"
    assert main(["sweep", *TINY, "--data", str(tmp_path / "xrays"), "--channels", "1", "--workers", "1",
                 "--out", str(out)]) == 0
    for kind, attack in (("privacy", "idlg"), ("utility", None)):
        cell = out / "cells" / cell_name(kind, "none", 0, attack)
        first_layer = next(iter(torch.load(cell / "model.pt", weights_only=True).values()))
        assert first_layer.shape[1] == 1, kind  # the trained model's first convolution takes one channel
