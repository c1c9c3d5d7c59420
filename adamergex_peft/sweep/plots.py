"""The sweep's figures: score against t (:func:`plot_png`), the score table as a heat map (:func:`heatmap_png`).

matplotlib is imported where used, through its ``Figure`` API (no pyplot, no backend change).
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

from adamergex_peft.sweep.plan import lang_label
from adamergex_peft.sweep.selection import first_best, is_finite_number

if TYPE_CHECKING:
    from adamergex_peft.sweep.results import SweepResults


def plot_png(results: SweepResults) -> bytes:
    """Score (and, where measured, calibrated score) against t, one line per method and language;
    t-free methods as horizontal dashed lines."""
    from matplotlib.figure import Figure

    panels = [("score", "score")]
    if any(is_finite_number(p.get("calibrated_score")) for p in results.points):
        panels.append(("calibrated_score", "calibrated score (acc_calibrated)"))
    fig = Figure(figsize=(6 * len(panels), 4), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    multi = results.langs() != [None]
    for ax, (measure, title) in zip(axes, panels):
        _plot_lines(ax, results, measure, multi)
        if not multi:
            _mark_picks(ax, results, measure)
        ax.set_xlabel("t")
        metric_names = sorted({c["metric"] for p in results.points for c in p.get("chosen", {}).values()})
        ax.set_ylabel(f"{title} ({', '.join(metric_names)})" if measure == "score" else title)
        ax.set_title(f"AdaMergeX: {title} against t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _png(fig)


def _plot_lines(ax, results: SweepResults, measure: str, multi: bool) -> None:
    """One line per (language, method) against t; a t-free method as a horizontal dashed line."""
    ts = sorted({p["t"] for p in results.points if p["t"] is not None}) or [0.0, 1.0]
    lines = list(dict.fromkeys((p.get("lang"), p["method"]) for p in results.points))
    for index, (lang, method) in enumerate(lines):
        pts = [p for p in results.points if p.get("lang") == lang and p["method"] == method]
        label = f"{lang} {method}" if multi else method
        if pts[0]["t"] is None:
            value = pts[0].get(measure)
            if is_finite_number(value):
                ax.hlines(value, min(ts), max(ts), linestyles="dashed", label=label, colors=f"C{index % 10}")
            continue
        pts = sorted((p for p in pts if is_finite_number(p.get(measure))), key=lambda p: p["t"])
        if pts:
            ax.plot(
                [p["t"] for p in pts],
                [p[measure] for p in pts],
                marker="o",
                label=label,
                color=f"C{index % 10}",
            )


def _mark_picks(ax, results: SweepResults, measure: str) -> None:
    """One language: a star on the best point of ``measure``, a diamond on the label-free pick."""
    best = results.best() if measure == "score" else first_best(results.points, lambda p: p.get(measure), True)
    if best is not None and best["t"] is not None and is_finite_number(best.get(measure)):
        ax.plot([best["t"]], [best[measure]], marker="*", markersize=14, color="gold", zorder=5, label="best")
    picked = results.best_label_free()
    if picked is not None and picked["t"] is not None and is_finite_number(picked.get(measure)):
        ax.plot(
            [picked["t"]],
            [picked[measure]],
            marker="D",
            markersize=8,
            markerfacecolor="none",
            color="black",
            zorder=6,
            label=f"label-free pick ({results.label_free_rule})",
        )


def heatmap_png(results: SweepResults) -> bytes:
    """The score table (languages x (method, t)) as a heat map with the values written in."""
    from matplotlib.figure import Figure

    columns, langs = results.columns(), results.langs()
    grid = results._grid(lambda p: p.get("score"))
    values = [
        [grid[lang].get(c) if is_finite_number(grid[lang].get(c)) else math.nan for c in columns] for lang in langs
    ]
    fig = Figure(figsize=(max(4.0, 0.9 * len(columns) + 2), max(2.5, 0.5 * len(langs) + 1.5)), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(columns)), labels=columns, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(len(langs)), labels=[lang_label(lang) for lang in langs])
    finite = [v for row in values for v in row if math.isfinite(v)]
    middle = (min(finite) + max(finite)) / 2 if finite else 0.0
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if math.isfinite(v):
                ax.text(
                    j,
                    i,
                    f"{v:.3f}",
                    ha="center",
                    va="center",
                    fontsize="x-small",
                    color="black" if v > middle else "white",
                )
    fig.colorbar(image, ax=ax, label="score")
    ax.set_title("AdaMergeX sweep: score")
    fig.tight_layout()
    return _png(fig)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
