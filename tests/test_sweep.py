"""`medpfl sweep`: defenses inside federated training, a grid that resumes after a kill, the trade-off files."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medpfl.cli import main
from medpfl.defenses import epsilon_spent, parse_defense
from medpfl.experiments.defended_training import train_with_defense
from medpfl.experiments.sweep import SweepConfig, cell_name
from medpfl.report.tradeoff import pareto_front

from held_out import utility_cell_accuracy

TINY = ["--attacks", "idlg", "--n-images", "1", "--image-size", "16", "--set", "idlg.steps=3",
        "--set", "idlg.restarts=0", "--rounds", "1", "--sites", "2", "--quiet"]


def test_defense_acts_inside_training_not_only_on_the_attackers_copy(tmp_path):
    sweep = SweepConfig(image_size=16, rounds=1, sites=2)
    plain = train_with_defense(parse_defense("none"), sweep, 0, tmp_path / "none")
    clipped = train_with_defense(parse_defense("clip:norm=1e-6"), sweep, 0, tmp_path / "clip")
    start, moved, held = (torch.load(tmp_path / name, weights_only=True)
                          for name in ("none/initial.pt", "none/final.pt", "clip/final.pt"))
    change = lambda w: sum((w[n] - start[n]).pow(2).sum() for n in start).sqrt().item()  # noqa: E731
    assert change(moved) > 0.1  # an undefended round moves the global model
    assert change(held) <= 1e-6 + 1e-7  # each site's update clipped to 1e-6: the average moves at most that
    assert plain["accuracy_chance"] > 0 and "accuracy" in clipped


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
    assert rows["secagg:k=2"]["accuracy"] == rows["none"]["accuracy"]  # the same aggregate, the same training
    assert rows["none"]["epsilon"] == ""
    utility = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "utility"]
    assert len(utility) == 3  # secure aggregation reuses the undefended federation


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
