"""What a run directory holds, read back for the report: attack runs, training runs and sweeps.

A report covers one directory: itself and the runs in its sub-directories. Each kind of run is recognised
by the files it writes, so the report renders whatever a directory holds:

- attack run (`medpfl attack`): config.json + results.jsonl (one line per victim), images/, summary.json
- training run (`medpfl train`): rounds.jsonl (utility per round), attacks.jsonl (per attacked round and
  site, the fields of an attack result plus round and site), attacks/ with the reconstructions
- sweep (`medpfl sweep`): cells.jsonl (one line per attack x defense x strength x seed) or tradeoff.csv
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medpfl.errors import MedPFLError
from medpfl.jsonl import read_jsonl

# Sub-directories that hold a run's own files, never other runs.
_NOT_RUNS = {"images", "attacks", "__pycache__"}
MAX_DEPTH = 4


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def attacked_png(folder: Path, round_: int, site: int, slot: int) -> Path:
    """Where a training run keeps the reconstruction of image `slot` behind the update of `site` at `round_`;
    a negative site is the aggregate of every site (fl.rounds.AGGREGATE), all a securely aggregating server sees."""
    who = "aggregate" if site < 0 else f"site{site:03d}"
    return folder / f"round{round_:04d}-{who}-{slot}.png"


@dataclass
class ImageResult:
    """One attacked image: how well it was reconstructed, and where its reconstruction lies."""

    run: str  # the run's name in the report
    attack: str
    defense: str
    victim: int
    slot: int  # position in the victim's batch
    item_id: str
    label: int | None
    recovered_label: int | None
    ssim: float
    psnr: float
    mse: float
    label_correct: bool | None
    reidentified: bool | None  # None where the run did not record it
    seconds: float  # the attack's wall time charged to this image
    reconstruction: Path
    round: int | None = None  # training runs: the round and site whose update was attacked
    site: int | None = None


@dataclass
class Run:
    """Files common to every kind of run."""

    path: Path
    name: str
    record: dict[str, Any]  # config.json as written: config, seed, versions, argv
    summary: dict[str, Any] | None

    @property
    def config(self) -> dict[str, Any]:
        return self.record.get("config", {}) if self.record else {}


@dataclass
class AttackRun(Run):
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def attack(self) -> str:
        return str(self.config.get("attack", "?"))

    @property
    def defense(self) -> str:
        return str((self.summary or {}).get("defense") or self.config.get("defense") or "none")

    def images(self) -> list[ImageResult]:
        """Every attacked image, in the order the run's summary lists them."""
        rows = []
        for r in sorted(self.results, key=lambda r: r["victim"]):
            rows += _image_rows(self.name, self.attack, self.defense, r,
                                lambda b, r=r: self.path / "images" / f"victim{r['victim']:05d}-{b}.png")
        return _with_reidentification(rows, self.summary)


@dataclass
class TrainRun(Run):
    rounds: list[dict[str, Any]] = field(default_factory=list)
    attacks: list[dict[str, Any]] = field(default_factory=list)
    federation: dict[str, Any] | None = None

    @property
    def attack(self) -> str:
        return str(self.config.get("attack") or "none")

    @property
    def defense(self) -> str:
        return str(self.config.get("defense") or "none")

    def images(self) -> list[ImageResult]:
        rows = []
        for a in sorted(self.attacks, key=lambda a: (a["round"], a["site"])):
            def where(b: int, a=a) -> Path:
                return attacked_png(self.path / "attacks", a["round"], a["site"], b)
            rows += _image_rows(self.name, self.attack, self.defense, a, where, a["round"], a["site"])
        return _with_reidentification(rows, self.summary)


@dataclass
class AuditRun(Run):
    """An audit's own directory: its config and the jobs it finished (the runs are its sub-directories)."""

    jobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SweepRun(Run):
    cells: list[dict[str, Any]] = field(default_factory=list)


def _with_reidentification(rows: list[ImageResult], summary: dict[str, Any] | None) -> list[ImageResult]:
    """`rows` marked with the summary's per-image re-identification (listed in the same order), where it has one."""
    reid = (summary or {}).get("reidentified")
    if reid is not None and len(reid) == len(rows):
        for row, hit in zip(rows, reid):
            row.reidentified = bool(hit)
    return rows


def _image_rows(run: str, attack: str, defense: str, r: dict[str, Any], where, round_=None, site=None
                ) -> list[ImageResult]:
    n = len(r["ssim"])
    items = r.get("items") or [""] * n
    labels = r.get("labels") or [None] * n
    recovered = r.get("recovered_labels") or [None] * n
    correct = r.get("label_correct") or [None] * n
    seconds = r.get("seconds", 0.0) / max(n, 1)  # a victim's share of the attack's time, split over its images
    return [ImageResult(run, attack, defense, int(r.get("victim", 0)), b, str(items[b]), labels[b], recovered[b],
                        float(r["ssim"][b]), float(r["psnr"][b]), float(r["mse"][b]), correct[b], None, seconds,
                        where(b), round_, site) for b in range(n)]


def _read_cells(path: Path) -> list[dict[str, Any]]:
    cells = read_jsonl(path / "cells.jsonl")
    if cells or not (path / "tradeoff.csv").exists():
        return cells
    with open(path / "tradeoff.csv", newline="") as fh:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _number(text: str | None) -> Any:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def load_run(path: Path, name: str) -> Run | None:
    """The run `path` holds, or None if it holds none (or nothing finished yet)."""
    record = _read_json(path / "config.json") or {}
    config = record.get("config", {}) if isinstance(record.get("config"), dict) else {}
    summary = _read_json(path / "summary.json")
    if (path / "audit.jsonl").exists():
        return AuditRun(path, name, record, summary, jobs=read_jsonl(path / "audit.jsonl"))
    if (path / "cells.jsonl").exists() or (path / "tradeoff.csv").exists() or (
            "defenses" in config and (path / "results.jsonl").exists()):
        return SweepRun(path, name, record, summary, cells=_read_cells(path))
    if (path / "rounds.jsonl").exists():
        return TrainRun(path, name, record, summary, rounds=read_jsonl(path / "rounds.jsonl"),
                        attacks=read_jsonl(path / "attacks.jsonl"), federation=_read_json(path / "federation.json"))
    results = read_jsonl(path / "results.jsonl")
    if results and "attack" in config and "ssim" in results[0]:
        return AttackRun(path, name, record, summary, results=results)
    if results and "round" in results[0] and "accuracy" in results[0]:  # a federation trained for its utility
        return TrainRun(path, name, record, summary, rounds=results)
    return None


def find_runs(root: str | os.PathLike[str]) -> list[Run]:
    """Every run in `root` and its sub-directories (depth-first, sorted by name)."""
    root = Path(root)
    if not root.is_dir():
        raise MedPFLError(f"Run directory '{root}' does not exist; pass a folder written by medpfl attack, "
                          "train, sweep or audit.")
    runs: list[Run] = []

    def visit(path: Path, depth: int) -> None:
        run = load_run(path, root.resolve().name if path == root else path.relative_to(root).as_posix())
        if run is not None:
            runs.append(run)
        if depth >= MAX_DEPTH:
            return
        for child in sorted(p for p in path.iterdir() if p.is_dir() and p.name not in _NOT_RUNS):
            visit(child, depth + 1)

    visit(root, 0)
    return runs
