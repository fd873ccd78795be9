"""`medpfl report RUN_DIR`: report.html (self-contained), results.csv (one row per attacked image), and a
summary.json for directories of several runs (a run's own summary.json is never rewritten)."""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from medpfl.attacks import display_name as attack_name
from medpfl.errors import MedPFLError
from medpfl.report.html import page
from medpfl.report.runs import AttackRun, AuditRun, TrainRun, find_runs
from medpfl.report.sections import SECTIONS
from medpfl.report.sources import Context
from medpfl.report.statistics import attack_table, defense_table, run_stats

CSV_FIELDS = ("run", "attack", "defense", "round", "site", "victim", "slot", "item_id", "label", "recovered_label",
              "label_correct", "ssim", "psnr", "mse", "reidentified", "seconds", "reconstruction")


def build_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write report.html (and results.csv, summary.json where missing) for the runs in `run_dir`;
    returns the path of the HTML file."""
    root = Path(run_dir)
    runs = find_runs(root)
    if not runs:
        raise MedPFLError(f"'{root}' holds no finished results (results.jsonl, rounds.jsonl, cells.jsonl or "
                          "tradeoff.csv); run medpfl attack, train, sweep or audit into it first.")
    ctx = Context(root, runs)
    sections = [s for s in (make(ctx) for make in SECTIONS) if s is not None]
    target = Path(out) if out else root / "report.html"
    subtitle = [f"Run directory: {root.resolve().name} ({len(runs)} run{'s' if len(runs) > 1 else ''}: "
                + ", ".join(sorted({_kind(r) for r in runs})) + ")",
                "Generated " + datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + " by medpfl report"]
    title = next((r.config["title"] for r in runs if isinstance(r, AuditRun) and r.config.get("title")),
                 "Privacy audit: what shared model updates reveal")
    html = page(title, subtitle, sections,
                "MedPFL report. It holds patients' images (originals and reconstructions): share it as you would "
                "the data itself.")
    _write(target, html)
    _write_results_csv(ctx, root / "results.csv")
    _write_collection_summary(ctx, root / "summary.json")
    return target


def _kind(run) -> str:
    return type(run).__name__.replace("Run", "").lower()


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_results_csv(ctx: Context, path: Path) -> None:
    """One row per attacked image of every run, for spreadsheets and scripts."""
    rows = ctx.images()
    if not rows:
        return
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            record = {k: getattr(r, k) for k in CSV_FIELDS if k != "reconstruction"}
            record["reconstruction"] = os.path.relpath(r.reconstruction, ctx.root)
            writer.writerow(record)
    os.replace(tmp, path)


def _write_collection_summary(ctx: Context, path: Path) -> None:
    """A summary of several runs, where the directory has none of its own (one written earlier by the
    report is refreshed)."""
    if path.exists():
        try:
            if json.loads(path.read_text()).get("kind") != "collection":
                return
        except (OSError, json.JSONDecodeError):
            return
    if len(ctx.runs) == 1 and ctx.runs[0].path == ctx.root:
        return  # a single run: its own command writes its summary
    runs = []
    for run in ctx.attacked:
        s = run_stats(run)
        runs.append({"run": run.name, "kind": _kind(run), "attack": run.attack, "attack_name": attack_name(run.attack),
                     "defense": run.defense, "model": run.config.get("model"), "n_images": s.n, "asr": s.asr,
                     "asr_chance": s.asr_chance, "mean_ssim": s.mean_ssim, "mean_psnr": s.mean_psnr,
                     "mean_mse": s.mean_mse, "label_accuracy": s.label_accuracy, "reid_rate": s.reid_rate,
                     "reid_chance": s.reid_chance,
                     "seconds_per_image": s.seconds_per_image, "epsilon": s.epsilon,
                     **({"final": run.rounds[-1]} if isinstance(run, TrainRun) and run.rounds else {})})
    for run in ctx.runs:
        if not isinstance(run, (AttackRun, TrainRun)) or not run.images():
            runs.append({"run": run.name, "kind": _kind(run), **({"summary": run.summary} if run.summary else {})})
    # The report's two tables as numbers: attacks by data set (the paper's layout) and defenses with utility.
    defenses = [{"sweep": sweep.name, **row} for sweep in ctx.sweeps for row in defense_table(sweep)]
    summary = {"kind": "collection", "runs": runs, "by_attack": attack_table(ctx.runs), "defenses": defenses}
    _write(path, json.dumps(summary, indent=2, default=str) + "\n")
