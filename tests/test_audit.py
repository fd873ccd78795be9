"""`medpfl audit`: a validated YAML config runs every job into one directory, resumes, and ends in one report."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from medpfl.cli import main
from medpfl.experiments.audit_config import SHIPPED, load_audit_config, shipped_config

from held_out import utility_cell_accuracy

SMALL = """
title: "Test audit"
data: {embedded: null}
image_size: 16
n_images: 2
attacks:
  - {name: idlg, settings: {steps: 3, restarts: 0}}
  - {name: dlg, settings: {steps: 3, restarts: 0}}
defenses: [none, "laplace:b=0.01"]
utility: {sites: 2, rounds: 1}
federation: {sites: 2, rounds: 2, model: lenet-idlg, norm: none, attack: idlg, attack_rounds: [1, 2],
             attack_sites: [1], attack_batch: 1, attack_settings: {steps: 3, restarts: 0}}
"""
JOBS = ["embedded/idlg-none-seed0", "embedded/dlg-none-seed0", "embedded/defenses", "embedded/federation-seed0"]


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """A finished tiny audit: two attacks, the Laplace defense grid with utility, a federation."""
    root = tmp_path_factory.mktemp("audit")
    config = root / "audit.yaml"
    config.write_text(SMALL)
    assert main(["audit", str(config), "--out", str(root / "out"), "--quiet"]) == 0
    return config, root / "out"


def test_audit_runs_every_job_resumes_and_writes_one_report(audit):
    config, out = audit
    ledger = _lines(out / "audit.jsonl")
    assert [j["dir"] for j in ledger] == JOBS
    rounds = _lines(out / "embedded/federation-seed0/rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2] and ledger[3]["accuracy"] == rounds[-1]["accuracy"]
    for job in ledger[:2]:
        summary = json.loads((out / job["dir"] / "summary.json").read_text())
        assert summary["n_images"] == 2 and job["asr"] == summary["asr"] and job["mean_mse"] == summary["mean_mse"]
    html = (out / "report.html").read_text()
    assert "Test audit" in html and "iDLG" in html and "DLG" in html
    assert "Federated training: utility and leakage per round" in html and "Leakage per round and site" in html
    # 2 + 2 attacked images, 2 x 2 x 2 under the defense grid, one probe image of site 1 at rounds 1 and 2
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 4 + 8 + 2
    # A killed audit: the last jobs' lines are lost; the same command redoes only those jobs.
    (out / "audit.jsonl").write_text(json.dumps(ledger[0]) + "\n")
    first_run = (out / ledger[0]["dir"] / "results.jsonl").stat().st_mtime_ns
    assert main(["audit", str(config), "--out", str(out), "--quiet"]) == 0
    assert [j["dir"] for j in _lines(out / "audit.jsonl")] == JOBS
    assert (out / ledger[0]["dir"] / "results.jsonl").stat().st_mtime_ns == first_run


def test_audit_defense_grid_measures_privacy_and_utility_per_laplace_level(audit):
    _, out = audit
    grid = out / "embedded/defenses"
    job = _lines(out / "audit.jsonl")[2]
    assert job["kind"] == "defenses" and job["rows"] == 4  # 2 attacks x (none, one Laplace level)
    cells = _lines(grid / "results.jsonl")
    privacy = {(c["attack"], c["defense"]): c for c in cells if c["kind"] == "privacy"}
    utility = {c["defense"]: c for c in cells if c["kind"] == "utility"}
    assert set(privacy) == {(a, d) for a in ("idlg", "dlg") for d in ("none", "laplace:b=0.01")}
    assert set(utility) == {"none", "laplace:b=0.01"}
    for defense, u in utility.items():  # the final model's accuracy on the federation's held-out images
        cell = grid / "cells" / f"utility-{defense.replace(':', '-')}-seed0"
        assert u["accuracy"] == pytest.approx(utility_cell_accuracy(cell, sites=2, seed=0, image_size=16), abs=1e-12)
    assert all(c["n_images"] == 2 and c["mean_mse"] > 0 for c in privacy.values())
    # The noise is in the attacked update and in every round of the federation, not only in the attacker's copy.
    assert privacy[("idlg", "laplace:b=0.01")]["mean_ssim"] != privacy[("idlg", "none")]["mean_ssim"]
    trained = {d: torch.load(grid / "cells" / f"utility-{d.replace(':', '-')}-seed0" / "model.pt", weights_only=True)
               for d in utility}
    assert any(not torch.equal(trained["none"][n], trained["laplace:b=0.01"][n]) for n in trained["none"])
    rows = {(r["attack"], r["defense"]): r for r in csv.DictReader(open(grid / "tradeoff.csv"))}
    assert set(rows) == set(privacy) and all(r["utility"] == "measured" for r in rows.values())
    laplace = rows[("idlg", "laplace:b=0.01")]
    assert float(laplace["accuracy"]) == utility["laplace:b=0.01"]["accuracy"]
    assert {(g["attack"], g["defense"]): g["accuracy"] for g in job["grid"]} == {
        key: utility[key[1]]["accuracy"] for key in privacy}  # the terminal's summary of the grid
    # The report: the defense table with utility beside privacy, the paper's table by attack and data set.
    html = (out / "report.html").read_text()
    u = utility["laplace:b=0.01"]
    assert re.search(r"<td>iDLG</td><td>laplace:b=0\.01</td>.*?<td class=num>"
                     + re.escape(f"{u['accuracy']:.3f} (chance {u['accuracy_chance']:.3f})")
                     + r"</td><td class=num>" + re.escape(f"{u['balanced_accuracy']:.3f}")
                     + r" \(chance 1/\d+\)</td><td class=num>" + re.escape(f"{u['auc']:.3f}"), html)
    idlg = json.loads((out / JOBS[0] / "summary.json").read_text())
    assert re.search(r"<td>embedded</td><td>iDLG</td><td>lenet-idlg</td><td class=num>1</td><td class=num>2</td>"
                     r"<td class=num>[^<]*</td><td class=num>" + re.escape(f"{idlg['mean_ssim']:.3f}")
                     + r"</td><td class=num>" + re.escape(f"{idlg['mean_mse']:.4f}") + "</td>", html)
    summary = json.loads((out / "summary.json").read_text())
    by_attack = {r["attack"]: r for r in summary["by_attack"]}
    assert set(by_attack) == {"idlg", "dlg"} and by_attack["idlg"]["mean_mse"] == pytest.approx(idlg["mean_mse"])
    assert by_attack["idlg"]["reid_chance"] == pytest.approx(idlg["reid_chance"])
    defended = {(r["attack"], r["defense"]): r for r in summary["defenses"]}
    assert defended[("idlg", "laplace:b=0.01")]["auc"] == pytest.approx(u["auc"])


@pytest.mark.parametrize("text, named", [
    ("attacks: [idlgx]", "'attacks[0].name' is 'idlgx'; valid values: dlg, idlg, cpl, "),
    ("threat: {batch: 2}", "'threat.batch' is unknown; valid keys in 'threat': batch_size, labels, bn_mode"),
    ("threat: {labels: maybe}", "'threat.labels' is 'maybe'; valid values: granted, recovered (or null)"),
    ("n_images: many", "'n_images' is 'many'; it must be int"),
    ("attacks: [{name: idlg, settings: {stepz: 3}}]", "no setting 'stepz'; valid settings:"),
    ("image_size: 32\n  bad: [", "not valid YAML at line"),
])
def test_a_wrong_key_or_value_is_one_sentence_naming_it(tmp_path, capsys, text, named):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["audit", str(config), "--out", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert named in err and "bad.yaml" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_and_check(name):
    assert shipped_config(name).exists()
    config = load_audit_config(name)
    assert config.attacks and config.data


def test_an_audit_that_names_no_attack_runs_the_strongest_attacker(tmp_path):
    """Left out, the attacks (and an attack entry's name, and the federation's attack) are `strongest`, as the
    sweep's; the shipped configs name theirs, so they still run what they say (demo: iDLG, DLG, CPL)."""
    config = tmp_path / "audit.yaml"
    config.write_text("federation: {model: lenet-idlg}\n")
    loaded = load_audit_config(config)
    assert [a.name for a in loaded.attacks] == ["strongest"] and loaded.federation.attack == "strongest"
    config.write_text("attacks: [{model: lenet-idlg, settings: {steps: 3}}]\n")
    assert load_audit_config(config).attacks[0].name == "strongest"
    demo = load_audit_config("demo")
    assert [a.name for a in demo.attacks] == ["idlg", "dlg", "cpl"] and demo.federation.attack == "idlg"
    assert {a.name for a in load_audit_config("medpfl-paper").attacks} == {"dlg", "idlg", "cpl", "invgrad"}


def test_the_defense_grid_runs_the_audits_seeds_channels_norm_models_and_threat(tmp_path):
    """Every setting of the audit reaches the defense grid's cells, not the sweep's defaults (seeds 0, 1, ...)."""
    config = tmp_path / "audit.yaml"
    config.write_text("""
data: {embedded: null}
image_size: 16
channels: 1
norm: group
n_images: 2
seeds: [3, 7]
threat: {batch_size: 2, labels: granted, bn_mode: eval}
attacks: [{name: idlg, model: lenet-dlg, settings: {steps: 2, restarts: 0}}]
defenses: ["laplace:b=0.01"]
""")
    out = tmp_path / "out"
    assert main(["audit", str(config), "--out", str(out), "--quiet"]) == 0
    cells = sorted((out / "embedded/defenses/cells").iterdir())
    seen = [json.loads((c / "config.json").read_text())["config"] for c in cells]
    assert sorted(s["seed"] for s in seen) == [3, 7]
    for s in seen:
        assert (s["channels"], s["norm"], s["model"], s["batch_size"], s["labels_granted"], s["bn_mode_used"]) == (
            1, "group", "lenet-dlg", 2, True, "eval")
    # The attack ran on what it was told: per seed one victim's update of 2 images.
    results = [json.loads(line) for c in cells for line in (c / "results.jsonl").read_text().splitlines()]
    assert [len(r["labels"]) for r in results] == [2, 2]


def test_one_attack_twice_in_the_defense_grid_is_refused_by_name(tmp_path, capsys):
    config = tmp_path / "audit.yaml"
    config.write_text("attacks: [{name: idlg}, {name: idlg, model: convnet}]\ndefenses: [none, 'laplace:b=0.01']\n")
    assert main(["audit", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'idlg' is listed more than once" in err and "defended: false" in err and "Traceback" not in err
