"""Plots for the report, drawn with matplotlib (Agg: no display needed) and returned as PNG bytes."""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from medpfl.report.tradeoff import label_rows  # noqa: E402

# Colours that stay distinct in greyscale print and for colour-blind readers (Okabe-Ito).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)


def ssim_strip(groups: dict[str, Sequence[float]], threshold: float) -> bytes:
    """SSIM of every attacked image, one column per run, with the success threshold drawn across."""
    names = list(groups)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 2), 3.2))
    for i, name in enumerate(names):
        values = list(groups[name])
        jitter = [(((k * 7919) % 97) / 97 - 0.5) * 0.35 for k in range(len(values))]  # fixed, not random
        ax.scatter([i + j for j in jitter], values, s=14, alpha=0.75, color=PALETTE[i % len(PALETTE)], linewidths=0)
        if values:
            mean = sum(values) / len(values)
            ax.plot([i - 0.3, i + 0.3], [mean, mean], color="black", linewidth=1.5)
    ax.axhline(threshold, color="#B00020", linestyle="--", linewidth=1)
    ax.text(len(names) - 0.5, threshold, f" recognisable (SSIM \u2265 {threshold:g})", color="#B00020",
            va="bottom", ha="right", fontsize=8)
    crowded = len(names) > 3 or sum(map(len, names)) > 60
    ax.set_xticks(range(len(names)), names, rotation=20 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel("SSIM to the original")
    ax.set_ylim(min(-0.05, min((min(v) for v in groups.values() if v), default=0) - 0.05), 1.05)
    ax.set_title("Each dot is one attacked image; black line: mean", fontsize=9)
    _style(ax)
    return _png(fig)


def per_round(rounds: Sequence[int], series: dict[str, Sequence[float | None]], ylabel: str, title: str,
              chance: float | None = None, ylim: tuple[float, float] | None = (0, 1.02)) -> bytes:
    """Lines over training rounds (utility, or leakage per site)."""
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    for i, (name, values) in enumerate(series.items()):
        points = [(r, v) for r, v in zip(rounds, values) if v is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, label=name, color=PALETTE[i % len(PALETTE)])
    if chance is not None:
        ax.axhline(chance, color="#777777", linestyle=":", linewidth=1)
        ax.text(ax.get_xlim()[1], chance, " chance", color="#777777", va="center", fontsize=8)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    _style(ax)
    return _png(fig)


def canary_scores(scores_in: Sequence[float], scores_out: Sequence[float], title: str) -> bytes:
    """Histograms of a privacy audit's canary scores: canaries in training against those left out."""
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    both = [*scores_in, *scores_out]
    bins = np.linspace(min(both), max(both), 40) if both and min(both) < max(both) else 10
    for i, (name, values) in enumerate((("in training", scores_in), ("left out", scores_out))):
        ax.hist(values, bins=bins, alpha=0.6, color=PALETTE[i], label=f"{name} ({len(values)})")
    ax.set_xlabel("canary score (higher: guessed in)")
    ax.set_ylabel("canaries")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    _style(ax)
    return _png(fig)


def tradeoff(points: Sequence[dict], x_label: str, y_label: str, front: Sequence[int], title: str) -> bytes:
    """Privacy (y, lower is safer) against utility (x, higher is better); the Pareto front joined by a line.

    `points` hold x, y, label and group (points of one group share a colour), optionally y_low and y_high (an
    interval, drawn as an error bar); `front` indexes the front.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    groups = list(dict.fromkeys(p["group"] for p in points))
    for i, group in enumerate(groups):
        members = [p for p in points if p["group"] == group]
        ax.scatter([p["x"] for p in members], [p["y"] for p in members], s=28, color=PALETTE[i % len(PALETTE)],
                   label=group, zorder=3)
        ranged = [p for p in members if p.get("y_low") is not None and p.get("y_high") is not None]
        if ranged:  # the rate's interval: how far the true value may lie from the few images observed
            ax.errorbar([p["x"] for p in ranged], [p["y"] for p in ranged], fmt="none", ecolor=PALETTE[i % len(PALETTE)],
                        elinewidth=0.8, capsize=2, alpha=0.7, zorder=2,
                        yerr=[[p["y"] - p["y_low"] for p in ranged], [p["y_high"] - p["y"] for p in ranged]])
    xy = [(p["x"], p["y"]) for p in points]
    x_span = (max(x for x, _ in xy) - min(x for x, _ in xy) or 1.0) if xy else 1.0
    y_span = (max(y for _, y in xy) - min(y for _, y in xy) or 1.0) if xy else 1.0
    order = sorted(range(len(points)), key=lambda i: xy[i][0])
    for i, row in zip(order, label_rows([xy[i] for i in order], x_span, y_span)):
        ax.annotate(points[i]["label"], xy[i], fontsize=7, xytext=(3, 3 + 9 * row), textcoords="offset points")
    if front:
        line = sorted((points[i] for i in front), key=lambda p: p["x"])
        ax.plot([p["x"] for p in line], [p["y"] for p in line], color="black", linewidth=1, linestyle="--",
                label="Pareto front", zorder=2)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    _style(ax)
    return _png(fig)
