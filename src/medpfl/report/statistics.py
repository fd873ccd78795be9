"""The report's numbers, computed from run records: each run's leak with its intervals and chance levels,
the paper's table of attacks pooled over seeds, the defense table of a sweep averaged over seeds, the settings it
recommends, and each image's risk. Pure functions of what the run directory holds; the wording is in sections."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any, NamedTuple

from medpfl.attacks import ATTACKS, display_name as attack_name
from medpfl.metrics.chance import pooled_label_chance
from medpfl.metrics.intervals import Rate, rate_interval
from medpfl.metrics.privacy import SUCCESS_SSIM  # runs that recorded another threshold say so in their summary
from medpfl.report.runs import AttackRun, ImageResult, Run, SweepRun, TrainRun
from medpfl.report.tradeoff import RATES


@dataclass
class RunStats:
    """A run's leak in numbers, computed from its per-image results so every kind of run is scored alike."""

    n: int
    asr: float
    mean_ssim: float
    mean_psnr: float
    mean_mse: float
    label_accuracy: float | None
    reid_rate: float | None
    seconds_per_image: float
    success_ssim: float = SUCCESS_SSIM
    asr_chance: float | None = None
    mean_ssim_chance: float | None = None
    reid_gallery: int | None = None
    num_classes: int | None = None
    label_chance: float | None = None  # a random guess of each update's labels, scored as the attack is
    epsilon: float | None = None

    @property
    def recognised(self) -> int:
        return round(self.asr * self.n)

    def interval(self, key: str) -> Rate:
        """The 95% (Wilson) interval of a rate of this run's images: "asr", "label_accuracy" or "reid_rate"."""
        return rate_interval(getattr(self, key), self.n)

    @property
    def reid_chance(self) -> float | None:
        """Re-identification by naming an image of the gallery at random."""
        return 1 / self.reid_gallery if self.reid_gallery else None


def run_stats(run: AttackRun | TrainRun) -> RunStats:
    rows = run.images()
    summary = run.summary or {}
    threshold = float(summary.get("success_ssim", run.config.get("success_ssim", SUCCESS_SSIM)))
    labels = [r.label_correct for r in rows if r.label_correct is not None]
    reid = [r.reidentified for r in rows if r.reidentified is not None]
    gallery = summary.get("reid_gallery_size")
    num_classes = summary.get("num_classes") or ((run.federation or {}).get("classes") and
                                                 len(run.federation["classes"]) if isinstance(run, TrainRun) else None)
    records = run.results if isinstance(run, AttackRun) else run.attacks
    return RunStats(
        n=len(rows),
        asr=sum(r.ssim >= threshold for r in rows) / len(rows),
        mean_ssim=fmean(r.ssim for r in rows),
        mean_psnr=fmean(r.psnr for r in rows),
        mean_mse=fmean(r.mse for r in rows),
        label_accuracy=sum(labels) / len(labels) if labels else None,
        reid_rate=(sum(reid) / len(reid) if len(reid) == len(rows)
                   else summary.get("reid_rate") if isinstance(run, AttackRun) else None),
        seconds_per_image=fmean(r.seconds for r in rows),
        success_ssim=threshold,
        asr_chance=summary.get("asr_chance"),
        mean_ssim_chance=summary.get("mean_ssim_chance"),
        reid_gallery=int(gallery) if gallery else None,
        num_classes=num_classes,
        label_chance=pooled_label_chance([r["labels"] for r in records if r.get("labels")], num_classes)
        if num_classes else None,
        epsilon=summary.get("epsilon"),
    )


def data_name(run: Run) -> str:
    """The data set a run attacked: the embedded set, or the last part of the user's path."""
    data = run.config.get("data")
    return "embedded" if not data else Path(str(data).rstrip("/")).name


def attack_order(attack: str) -> int:
    """The registry's order of attacks (the papers' first); attacks not registered here after them."""
    names = list(ATTACKS)
    return names.index(attack) if attack in names else len(names)


# Numbers pooled over runs, each run weighted by its number of images (so a mean is over all images).
_POOLED = ("asr", "asr_chance", "mean_ssim", "mean_mse", "mean_psnr", "seconds_per_image", "label_accuracy",
           "label_chance", "reid_rate", "reid_chance")


def attack_table(all_runs: list[Run]) -> list[dict[str, Any]]:
    """The paper's layout: one row per data set, attack and model, its undefended attack runs pooled over seeds.

    A sweep's runs belong to the defense table; they count here only where the directory holds no others."""
    runs = [r for r in all_runs if isinstance(r, AttackRun) and r.defense == "none" and r.images()]
    sweeps = [r for r in all_runs if isinstance(r, SweepRun)]
    outside = [r for r in runs if not any(r.path.is_relative_to(s.path) for s in sweeps)]
    groups: dict[tuple[str, str, str], list[AttackRun]] = defaultdict(list)
    for run in outside or runs:
        groups[(data_name(run), run.attack, str(run.config.get("model", "?")))].append(run)
    data_order = list(dict.fromkeys(key[0] for key in groups))
    rows = []
    for (data, attack, model), group in sorted(groups.items(), key=lambda kv: (
            data_order.index(kv[0][0]), attack_order(kv[0][1]), kv[0][1], kv[0][2])):
        stats = [run_stats(r) for r in group]
        row: dict[str, Any] = {"data": data, "attack": attack, "attack_name": attack_name(attack), "model": model,
                               "seeds": len({r.config.get("seed") for r in group}), "n_images": sum(s.n for s in stats)}
        for key in _POOLED:
            weighted = [(getattr(s, key), s.n) for s in stats if getattr(s, key) is not None]
            row[key] = sum(v * n for v, n in weighted) / sum(n for _, n in weighted) if weighted else None
            if key in RATES:
                row.update(rate_interval(row[key], sum(n for _, n in weighted)).as_dict(key))
        rows.append(row)
    return rows


# Column names a sweep may use, first match wins.
PRIVACY_COLUMNS = ("asr", "mean_ssim")
UTILITY_COLUMNS = ("accuracy", "balanced_accuracy", "auc", "test_accuracy")


def first_column(cells: list[dict], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if any(isinstance(c.get(n), (int, float)) for c in cells)), None)


def _cell_label(cell: dict) -> str:
    for key in ("defense_label", "defense", "spec"):
        if cell.get(key):
            return str(cell[key])
    return "none"


_COUNTS = ("seeds", "n_images")  # summed over a setting's cells, every other number averaged


def defense_table(sweep: SweepRun) -> list[dict[str, Any]]:
    """One row per attack x defense setting, in the grid's order, its cells averaged over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in sweep.cells:
        groups[(str(cell.get("attack", "")), _cell_label(cell))].append(cell)
    averaged = []
    for (attack, defense), cells in groups.items():
        row: dict[str, Any] = {"attack": attack, "defense": defense,
                               "seeds": sum(int(c.get("seeds") or 1) for c in cells)}
        numbers = dict.fromkeys(k for c in cells for k, v in c.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seeds")
        for key in numbers:  # in the file's column order
            values = [c[key] for c in cells if isinstance(c.get(key), (int, float))]
            row[key] = (sum(values) if key in _COUNTS else fmean(values)) if values else None
        for key in RATES:  # 95% intervals over the images scored (also for sweeps written before they were kept)
            if row.get(key) is not None and row.get("n_images"):
                row.update(rate_interval(row[key], int(row["n_images"])).as_dict(key))
        averaged.append(row)
    return averaged


SAFE_ASR = 0.1  # the observed ASR below which a defense setting counts as stopping an attack


class Recommendation(NamedTuple):
    """Against `attack`, the defense setting (a defense-table row) to deploy; `safe`: its observed ASR is below
    SAFE_ASR, else it is the least leaky of the settings tested."""

    attack: str
    setting: dict[str, Any]
    safe: bool


def recommendations(cells: list[dict[str, Any]], privacy: str, utility: str) -> list[Recommendation]:
    """Per attack: the setting with the best utility among those that keep ASR below SAFE_ASR, or, where none
    does, the one that leaks least (best utility among equals)."""
    chosen = []
    for attack in sorted({c["attack"] for c in cells}):
        mine = [c for c in cells if c["attack"] == attack and c.get(privacy) is not None and c.get(utility) is not None]
        below = [c for c in mine if c[privacy] < SAFE_ASR] if privacy == "asr" else []
        if below:
            chosen.append(Recommendation(attack, max(below, key=lambda c: c[utility]), True))
        elif mine:
            chosen.append(Recommendation(attack, min(mine, key=lambda c: (c[privacy], -c[utility])), False))
    return chosen


def update_leak(record: dict[str, Any]) -> tuple[float, float, float]:
    """ASR, mean SSIM and mean PSNR of the images behind one attacked update of a training run."""
    ssim = record["ssim"]
    return sum(s >= SUCCESS_SSIM for s in ssim) / len(ssim), fmean(ssim), fmean(record["psnr"])


def risk_level(row: ImageResult, threshold: float = SUCCESS_SSIM) -> str:
    """High: a recognisable copy. Medium: not recognisable by SSIM, yet it singles out the patient's image.
    Low: neither."""
    if row.ssim >= threshold:
        return "high"
    if row.reidentified:
        return "medium"
    return "low"
