"""`medpfl report`: one self-contained HTML page a privacy officer can open anywhere, plus results.csv."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from chromium_driver import Browser, file_url, find_chromium
from medpfl.cli import main

QUICK = ["--image-size", "16", "--steps", "3", "--restarts", "0", "--quiet"]


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory) -> Path:
    """A folder of two real attack runs (iDLG and DLG), as an audit would lay them out."""
    root = tmp_path_factory.mktemp("audit")
    for attack, n in (("idlg", 4), ("dlg", 2)):
        assert main(["attack", "--attack", attack, "--n-images", str(n), "--out", str(root / attack), *QUICK]) == 0
    return root


def _images(html: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)


def test_attack_writes_a_self_contained_report(audit_dir):
    run = audit_dir / "idlg"
    html = (run / "report.html").read_text()
    summary = json.loads((run / "summary.json").read_text())
    # Every image is an embedded PNG that decodes; nothing points outside the file.
    sources = _images(html)
    assert len(sources) >= 1 + 2 * 4  # the SSIM plot, originals and reconstructions
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert not re.search(r'(src|href)\s*=\s*"(?!data:|#)', html)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    # The numbers a reader relies on, with their meaning and chance level.
    # A rate of 4 images is worded as what was observed, with how far the true rate may lie (Wilson, 95%).
    from scipy.stats import binomtest

    recognised = round(summary["asr"] * 4)
    wilson = binomtest(recognised, 4).proportion_ci(confidence_level=0.95, method="wilson")
    if recognised == 0:
        assert ("no attack tried reconstructed any of 4 images; with 4 images the true rate may be up to "
                f"{wilson.high:.2f}") in html
    else:
        assert f"reconstructed {recognised} of 4 images ({summary['asr']:.2f}; 95% interval {wilson.low:.2f}-" in html
    assert f"{summary['asr']:.2f} [{wilson.low:.2f}-{wilson.high:.2f}]" in html  # beside the ASR in the table
    assert not re.search(r"\bsafe\b", html, re.IGNORECASE)  # a verdict says what was observed
    assert f"1 in {summary['reid_gallery_size']}" in html and summary["reid_gallery_size"] > 4
    for heading in ("Threat model", "Results per attack", "Originals beside reconstructions", "Per-image risk ranking",
                    "Provenance"):
        assert heading in html
    assert "recovered by the attacker from the update itself" in html and "torch" in html
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert len(rows) == 4 and sorted(float(r["ssim"]) for r in rows) == sorted(s for r in map(
        json.loads, (run / "results.jsonl").read_text().splitlines()) for s in r["ssim"])


def test_report_of_a_folder_of_runs_keeps_each_runs_summary(audit_dir):
    own = {name: (audit_dir / name / "summary.json").read_bytes() for name in ("idlg", "dlg")}
    assert main(["report", str(audit_dir), "--quiet"]) == 0
    html = (audit_dir / "report.html").read_text()
    assert "iDLG" in html and "DLG" in html
    assert {name: (audit_dir / name / "summary.json").read_bytes() for name in own} == own
    rows = list(csv.DictReader(open(audit_dir / "results.csv")))
    assert sorted(r["run"] for r in rows) == ["dlg"] * 2 + ["idlg"] * 4
    collection = json.loads((audit_dir / "summary.json").read_text())
    assert collection["kind"] == "collection" and {r["run"] for r in collection["runs"]} == {"idlg", "dlg"}


def test_report_renders_in_chromium_without_network(audit_dir):
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium on PATH (chromium, chromium-browser, google-chrome); .ci/run installs Debian's")
    browser = Browser(executable)
    try:
        session = browser.open(file_url(audit_dir / "idlg" / "report.html"))
        seen = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """JSON.stringify({
            images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width]),
            tables: Array.from(document.querySelectorAll('table')).map(t => t.rows.length),
            height: document.body.scrollHeight})"""}, session=session)
        page = json.loads(seen["result"]["value"])
        pdf = base64.b64decode(browser.send("Page.printToPDF", {}, session=session)["data"])
        requested = browser.requested_urls()
    finally:
        browser.close()
    assert len(page["images"]) >= 9 and all(done and width > 0 and shown > 0 for done, width, shown in page["images"])
    assert len(page["tables"]) >= 4 and all(rows >= 2 for rows in page["tables"])
    assert page["height"] > 1000
    assert pdf.startswith(b"%PDF") and len(pdf) > 20_000  # it prints, images included
    outside = [u for u in requested if not u.startswith(("file:", "data:"))]
    assert requested and not outside, outside


def test_a_failing_report_never_costs_the_results(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "report.html").mkdir(parents=True)  # a folder where the report should go: writing it fails
    assert main(["attack", "--attack", "idlg", "--n-images", "2", "--out", str(out), *QUICK]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "summary.json").read_text())["n_images"] == 2
    assert "medpfl report" in " ".join(capsys.readouterr().err.split())


def test_report_of_a_folder_without_results_is_one_sentence(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "holds no finished results" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in " ".join(capsys.readouterr().err.split())


def test_a_recommended_defense_that_still_lets_patients_be_re_identified_says_so(tmp_path):
    """Dermoscopy patches at 16 px (two class folders, 120 images): Gaussian noise 0.01 stopped every recognisable
    copy (0 of 10), yet 3 of the 10 reconstructions were nearest their own patient among 120 images (interval
    0.11-0.60, chance 1/120). The recommendation called it safe without a word of that; a setting whose
    re-identification stays within chance gets no caution."""
    import csv as csv_module

    from medpfl.metrics.intervals import wilson

    def row(defense: str, asr_hits: int, reid_hits: int) -> dict:
        return {"attack": "strongest", "defense": defense, "seeds": 1, "n_images": 10, "asr": asr_hits / 10,
                "asr_chance": 0.0, "mean_ssim": 0.15, "label_accuracy": 1.0, "label_chance": 0.5,
                "reid_rate": reid_hits / 10, "reid_chance": 1 / 120, **wilson(asr_hits, 10).as_dict("asr"),
                **wilson(reid_hits, 10).as_dict("reid_rate"), "accuracy": 0.8, "balanced_accuracy": 0.8, "auc": 0.9,
                "accuracy_chance": 0.5, "balanced_accuracy_chance": 0.5, "test_images": 30, "utility": "measured"}

    rows = [row("none", 10, 10), row("gaussian:sigma=0.01", 0, 3), row("gaussian:sigma=0.1", 0, 0)]
    (tmp_path / "config.json").write_text(json.dumps({"config": {"defenses": [r["defense"] for r in rows]}}))
    with open(tmp_path / "tradeoff.csv", "w", newline="") as fh:
        writer = csv_module.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["report", str(tmp_path), "--quiet"]) == 0
    page = " ".join((tmp_path / "report.html").read_text().split())
    assert "gaussian:sigma=0.01 (though its reconstructions still re-identify 3 of 10 patients, chance 1/120)" in page
    assert "gaussian:sigma=0.1 (though" not in page
