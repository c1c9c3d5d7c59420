"""The demo's outputs: one table (text), the raw numbers (JSON) and a chart (PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from adamergex_peft.demo.results import CHART_PNG, RESULTS_JSON, TABLE_TXT, DemoResult, gap_share, table_rows

__all__ = ["FAMILY_LABELS", "chart_png", "format_table", "gap_share", "table_rows", "write_outputs"]

FAMILY_LABELS = {"lora": "LoRA", "ia3": "(IA)^3"}


def _pct(value: float | None, missing: str = "error") -> str:
    return missing if value is None else f"{100 * value:.1f}"


def format_table(result: DemoResult) -> str:
    """The table as fixed-width text (what ``adamergex demo`` prints)."""
    targets = result.targets
    header = ["adapter", "method", *targets, "mean", "gap closed", *[f"cal {lang}" for lang in targets], "cal mean"]
    header.append("cal gap closed")
    lines = []
    body = []
    for row in table_rows(result):

        def share_text(share: float | None, method: str = row["method"]) -> str:
            return "" if method in ("task_only", "oracle") else ("n/a" if share is None else f"{share:+.0%}")

        body.append(
            [
                FAMILY_LABELS.get(row["family"], row["family"]),
                row["method"],
                *[_pct(row["scores"][lang]) for lang in targets],
                _pct(row["mean"]),
                share_text(row["gap_closed"]),
                *[_pct(row["calibrated_scores"].get(lang), "n/a") for lang in targets],
                _pct(row["calibrated_mean"], "n/a"),
                share_text(row["calibrated_gap_closed"]),
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        first = [str(c).ljust(w) for c, w in zip(cells[:2], widths[:2])]
        rest = [str(c).rjust(w) for c, w in zip(cells[2:], widths[2:])]
        return "  ".join(first + rest)

    lines.append(fmt(header))
    lines.append("  ".join("-" * w for w in widths))
    previous = None
    for cells in body:
        if previous is not None and cells[0] != previous:
            lines.append("")
        previous = cells[0]
        lines.append(fmt(cells))
    t = result.settings.get("t")
    notes = [
        f"Accuracy (%) on the target-language test sets (lm-eval, multiple choice, chance = {100 / 4:.0f}%); merges at t={t:g}.",
        "gap closed = (mean - task_only) / (oracle - task_only): 0% = no better than the source task adapter, "
        "100% = as good as an adapter trained on target-language labels.",
        "cal = accuracy after label-free calibration of the answer prior over each test set (acc_calibrated: class "
        "offsets that make the predicted shares uniform; no labels read). Raw accuracy hides a merge that only "
        "shifts the prior; the calibrated columns show what is left of its ranking.",
        "Source-language accuracy of the task adapter: "
        + ", ".join(f"{FAMILY_LABELS.get(f, f)} {100 * s:.1f}%" for f, s in result.source_scores.items())
        + f" ({result.source}).",
    ]
    return "\n".join(lines + [""] + notes)


def chart_png(result: DemoResult) -> bytes:
    """Grouped bars: accuracy per method and target language, one panel per adapter family."""
    import io

    from matplotlib.figure import Figure  # the Figure API draws without pyplot or a backend switch

    families = list(result.scores)
    fig = Figure(figsize=(5.5 * len(families), 4.2), dpi=100)
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    for ax, family in zip(axes, families):
        table = result.scores[family]
        methods = list(table)
        width = 0.8 / max(1, len(result.targets))
        for j, lang in enumerate(result.targets):
            xs = [i + (j - (len(result.targets) - 1) / 2) * width for i in range(len(methods))]
            heights = [0.0 if table[m][lang] is None else 100 * table[m][lang] for m in methods]
            ax.bar(xs, heights, width=width, label=lang)
        ax.axhline(25, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([m.replace(" (no adapter)", "") for m in methods], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{FAMILY_LABELS.get(family, family)}: target-language accuracy")
        ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_outputs(result: DemoResult, output: Path) -> dict[str, Path]:
    """Write ``demo_results.json``, ``demo_table.txt`` and ``demo_results.png`` atomically."""
    from adamergex_peft.atomic import atomic_write_bytes, atomic_write_text

    paths = {"json": output / RESULTS_JSON, "table": output / TABLE_TXT, "png": output / CHART_PNG}
    atomic_write_text(paths["json"], json.dumps(_clean(result.to_dict()), indent=2) + "\n")
    atomic_write_text(paths["table"], format_table(result) + "\n")
    atomic_write_bytes(paths["png"], chart_png(result))
    return paths
