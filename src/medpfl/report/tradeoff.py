"""The privacy-utility trade-off of a sweep: a CSV table and a plot with the Pareto front marked."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any, Sequence

from medpfl.metrics.intervals import rate_interval

# Privacy per defense setting; each rate with its chance level (an attacker answering or guessing at random).
PRIVACY_KEYS = ("asr", "asr_chance", "mean_ssim", "mean_psnr", "mean_mse", "label_accuracy", "label_chance",
                "reid_rate", "reid_chance", "seconds_per_image")
# Rates of images, pooled over seeds, each with its 95% (Wilson) interval: KEY_low, KEY_high, KEY_n (images).
RATES = ("asr", "label_accuracy", "reid_rate")
INTERVAL_KEYS = tuple(f"{k}_{end}" for k in RATES for end in ("low", "high", "n"))
UTILITY_KEYS = ("accuracy", "balanced_accuracy", "auc")
UTILITY_CHANCE = ("accuracy_chance", "balanced_accuracy_chance")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes: higher utility (x) and lower leak (y)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(x2 >= x and y2 <= y and (x2 > x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _mean(values: list[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(numbers) / len(numbers) if numbers else None


def _privacy_value(cell: dict[str, Any], key: str) -> Any:
    """A privacy cell's `key`; None where an older sweep did not record it."""
    if key == "label_chance" and cell.get(key) is None:  # older sweeps: 1/K holds for one image per update only
        return 1 / cell["num_classes"] if cell.get("num_classes") and cell.get("images_per_update", 1) == 1 else None
    return cell.get(key)


def tradeoff_rows(privacy: list[dict[str, Any]], utility: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per attack and defense: privacy and utility averaged over seeds, epsilon where defined."""
    by_defense: dict[str, list[dict[str, Any]]] = {}
    for u in utility:
        by_defense.setdefault(u["defense"], []).append(u)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in privacy:
        groups.setdefault((p["attack"], p["defense"]), []).append(p)
    rows = []
    for (attack, defense), cells in groups.items():
        trained = by_defense.get(cells[0].get("trained_as", defense), [])
        row: dict[str, Any] = {"attack": attack, "defense": defense, "seeds": len(cells),
                               "n_images": sum(c["n_images"] for c in cells)}
        row.update({k: _mean([_privacy_value(c, k) for c in cells]) for k in PRIVACY_KEYS})
        for key in RATES:  # pooled over every image scored, so the interval's n is the images
            scored = [(c[key], c["n_images"]) for c in cells if c.get(key) is not None]
            trials = sum(n for _, n in scored)
            row[key] = sum(v * n for v, n in scored) / trials if trials else None
            row.update(rate_interval(row[key], trials).as_dict(key))
        # The model the attacked updates came from and the one whose utility is shown: equal unless --privacy paper.
        row["model"] = cells[0].get("model")
        row["trained_model"] = trained[0].get("model") if trained else None
        row.update({k: _mean([u.get(k) for u in trained]) for k in UTILITY_KEYS})
        row["utility"] = "measured" if trained else "pending"
        row.update({k: trained[0].get(k) if trained else None for k in UTILITY_CHANCE})
        counted = [u["test_images"] for u in trained if u.get("test_images")]  # pooled over seeds, as the rates
        row["test_images"] = sum(counted) if counted and len(counted) == len(trained) else None
        row["epsilon"] = _mean([c.get("epsilon") for c in cells])  # DP-SGD: the worst-off site's
        per_site = [u["epsilon_per_site"] for u in trained if u.get("epsilon_per_site")]
        row["epsilon_per_site"] = (" ".join(f"{_mean(list(e)):.3f}" for e in zip(*per_site)) if per_site else None)
        row["delta"] = cells[0].get("delta")
        # The one-run privacy audit of the trained federation (--audit-dp): each seed's 95% lower bound, averaged,
        # flagged when any seed's exceeds its accountant's epsilon. None under secure aggregation: the audit
        # scores each site's update, which that server never sees.
        secure = cells[0].get("trained_as", defense) != defense
        audited = [u for u in trained if u.get("epsilon_measured") is not None and not secure]
        row["epsilon_measured"] = _mean([u["epsilon_measured"] for u in audited])
        row["guarantee_broken"] = any(u.get("guarantee_broken") for u in audited) if audited else None
        rows.append(row)
    return rows


def beats_chance(row: dict[str, Any]) -> bool | None:
    """Whether a row's trained model learned anything: its test accuracy's 95% interval lies above the majority
    class's share (what a model that learned nothing reaches), or its balanced accuracy's above 1/classes (read
    as a rate over the same test images, an approximation). A plain comparison where the number of test images
    was not recorded (older sweeps). None where utility is pending."""
    verdicts = []
    for key, chance in zip(("accuracy", "balanced_accuracy"), UTILITY_CHANCE):
        if isinstance(row.get(key), (int, float)) and isinstance(row.get(chance), (int, float)):
            n = int(row["test_images"]) if row.get("test_images") else 0
            low = rate_interval(row[key], n).low if n else row[key]
            verdicts.append(low > row[chance])
    return any(verdicts) if verdicts else None


def utility_at_chance(rows: list[dict[str, Any]]) -> str | None:
    """A warning when no trained federation among `rows` beats chance: then its utility cannot show what a
    defense costs, and a ranking on it would be noise. None when one does, or where utility is pending."""
    verdicts = [(row, beats_chance(row)) for row in rows]
    measured = [row for row, verdict in verdicts if verdict is not None]
    if not measured or any(verdict for _, verdict in verdicts):
        return None
    best = max(measured, key=lambda r: r["accuracy"])
    return (f"No federation of this sweep beats chance: the best test accuracy is {best['accuracy']:.3f} "
            f"({best['defense']}), where always answering the majority class scores {best['accuracy_chance']:.3f}, "
            "so its utility cannot show what a defense costs. Train the sites on more images for more rounds "
            "(--site-images, --rounds; --protocol fedavg) for the cost in accuracy.")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The trade-off table as CSV (empty fields where a value is undefined or pending)."""
    columns = ["attack", "defense", "seeds", "n_images", *PRIVACY_KEYS, *INTERVAL_KEYS, *UTILITY_KEYS,
               *UTILITY_CHANCE, "test_images", "utility", "epsilon", "epsilon_measured", "guarantee_broken", "epsilon_per_site",
               "delta", "model", "trained_model"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def _short(defense: str) -> str:
    """A plot label without DP-SGD's schedule (rate, steps), which the CSV keeps."""
    return re.sub(r",(rate|steps)=[^,+]*", "", defense)


def _point_label(row: dict[str, Any]) -> str:
    """A point's label: the defense and, in an audited sweep, epsilon between the accountant's upper bound and the
    audit's measured lower bound (95%)."""
    if row.get("epsilon_measured") is None:
        return _short(row["defense"])
    upper = "" if row.get("epsilon") is None else f"\u2264{row['epsilon']:.2f}, "
    return f"{_short(row['defense'])} (\u03b5 {upper}\u2265{row['epsilon_measured']:.2f})"


def label_rows(points: Sequence[tuple[float, float]], x_span: float, y_span: float) -> list[int]:
    """For labels written right of each point: the row (0, 1, ...) above its point that keeps it off the
    labels of points just left of it, which otherwise overprint (many defenses share ASR 0 at nearby accuracy)."""
    rows: list[int] = []
    for i, (x, y) in enumerate(points):
        taken = {rows[j] for j, (xj, yj) in enumerate(points[:i])
                 if 0 <= x - xj < 0.2 * x_span and abs(y - yj) < 0.06 * y_span}
        rows.append(next(r for r in range(len(points) + 1) if r not in taken))
    return rows


def _asr_error(rows: list[dict[str, Any]]) -> list[list[float]]:
    """Matplotlib's asymmetric error bars (below, above) of each row's ASR from its interval."""
    return [[r["asr"] - r["asr_low"] for r in rows], [r["asr_high"] - r["asr"] for r in rows]]


def plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> None:
    """Leak (ASR) against utility (test accuracy), one panel per attack, Pareto front joined by a line.

    Where utility is still pending the panel shows ASR per defense instead, and says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted({r["attack"] for r in rows})
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.5 * len(attacks), 4.5), squeeze=False)
    at_chance = utility_at_chance(rows) is not None
    for ax, attack in zip(axes[0], attacks):
        mine = [r for r in rows if r["attack"] == attack]
        measured = [r for r in mine if r["accuracy"] is not None]
        if measured:
            measured.sort(key=lambda r: r["accuracy"])
            points = [(r["accuracy"], r["asr"]) for r in measured]
            ax.errorbar(*zip(*points), yerr=_asr_error(measured), fmt="o", color="tab:blue", ecolor="tab:blue",
                        elinewidth=0.8, capsize=2, label="ASR, 95% interval")
            x_span = max(x for x, _ in points) - min(x for x, _ in points) or 1.0
            for r, (x, y), row in zip(measured, points, label_rows(points, x_span, 1.0)):
                ax.annotate(_point_label(r), (x, y), fontsize=7, xytext=(3, 3 + 9 * row),
                            textcoords="offset points", color="tab:red" if r.get("guarantee_broken") else None)
            broken = [p for r, p in zip(measured, points) if r.get("guarantee_broken")]
            if broken:
                ax.scatter(*zip(*broken), s=120, facecolors="none", edgecolors="tab:red", zorder=3,
                           label="measured \u03b5 > accountant's: guarantee broken")
            front = sorted((points[i] for i in pareto_front(points)), key=lambda p: p[0])
            ax.plot(*zip(*front), color="tab:red", marker="o", label="Pareto front")
            chance = measured[0].get("accuracy_chance")
            if chance is not None:
                ax.axvline(chance, color="grey", linestyle=":", label="accuracy by chance")
            ax.axhline(0.1, color="grey", linestyle="--", linewidth=0.8, label="ASR 0.1")
            ax.set_xlabel("test accuracy of the federated model (utility)"
                          + ("\nno model beats chance: the cost in accuracy is not measured" if at_chance else ""),
                          color="tab:red" if at_chance else None)
            ax.set_ylabel("attack success rate (SSIM >= 0.9)")
            ax.set_ylim(-0.03, 1.1)
            left = min(points[0][0], chance if chance is not None else points[0][0])
            ax.set_xlim(left - 0.05 * x_span, points[-1][0] + 0.25 * x_span)  # room for the labels
            ax.legend(fontsize=7)
        else:
            ax.barh([_short(r["defense"]) for r in mine], [r["asr"] for r in mine], color="tab:blue",
                    xerr=_asr_error(mine), error_kw={"elinewidth": 0.8, "capsize": 2})
            ax.set_xlim(0, 1.03)
            ax.invert_yaxis()  # the grid's order, top to bottom
            ax.set_xlabel("ASR with 95% interval (utility pending: no federated training in this sweep)")
        ax.set_title(attack)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
