"""`medpfl audit`: a validated YAML config runs every job into one directory, resumes, and ends in one report."""

from __future__ import annotations

import json
import pytest

from medpfl.cli import main
from medpfl.experiments.audit_config import SHIPPED, load_audit_config, shipped_config

SMALL = """
title: "Test audit"
data: {embedded: null}
image_size: 16
n_images: 2
attacks:
  - {name: idlg, settings: {steps: 3, restarts: 0}}
  - {name: dlg, settings: {steps: 3, restarts: 0}}
defenses: [none]
federation: {sites: 2, rounds: 2, model: lenet-idlg, norm: none, attack: idlg, attack_rounds: [1, 2],
             attack_sites: [1], attack_batch: 1, attack_settings: {steps: 3, restarts: 0}}
"""


def test_audit_runs_every_job_resumes_and_writes_one_report(tmp_path):
    config = tmp_path / "audit.yaml"
    config.write_text(SMALL)
    out = tmp_path / "audit"
    assert main(["audit", str(config), "--out", str(out), "--quiet"]) == 0
    ledger = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert [j["dir"] for j in ledger] == ["embedded/idlg-none-seed0", "embedded/dlg-none-seed0",
                                          "embedded/federation-seed0"]
    rounds = [json.loads(line) for line in (out / "embedded/federation-seed0/rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and ledger[2]["accuracy"] == rounds[-1]["accuracy"]
    for job in ledger[:2]:
        summary = json.loads((out / job["dir"] / "summary.json").read_text())
        assert summary["n_images"] == 2 and job["asr"] == summary["asr"]
    html = (out / "report.html").read_text()
    assert "Test audit" in html and "iDLG" in html and "DLG" in html
    assert "Federated training: utility and leakage per round" in html and "Leakage per round and site" in html
    # 2 + 2 attacked images, and one probe image of site 1 at rounds 1 and 2
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 4 + 2
    # A killed audit: the last jobs' lines are lost; the same command redoes only those jobs.
    (out / "audit.jsonl").write_text(json.dumps(ledger[0]) + "\n")
    first_run = (out / ledger[0]["dir"] / "results.jsonl").stat().st_mtime_ns
    assert main(["audit", str(config), "--out", str(out), "--quiet"]) == 0
    assert len((out / "audit.jsonl").read_text().splitlines()) == 3
    assert (out / ledger[0]["dir"] / "results.jsonl").stat().st_mtime_ns == first_run


@pytest.mark.parametrize("text, named", [
    ("attacks: [idlgx]", "'attacks[0].name' is 'idlgx'; valid values: dlg, idlg, cpl, invgrad"),
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
