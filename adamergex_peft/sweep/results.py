"""The record of a sweep (:class:`SweepResults`): its points, the picks, and the files it writes."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adamergex_peft.atomic import atomic_write_bytes, atomic_write_text
from adamergex_peft.sweep.plan import SweepPoint, lang_label
from adamergex_peft.sweep.plots import heatmap_png as _heatmap_png
from adamergex_peft.sweep.plots import plot_png as _plot_png
from adamergex_peft.sweep.selection import (
    ALL_LANGS,
    DEFAULT_LABEL_FREE_RULE,
    LABEL_FREE_RULES,
    SELECT_CHOICES,
    first_best,
    is_finite_number,
    label_free_value,
)

RESULTS_JSON = "sweep_results.json"
RESULTS_CSV = "sweep_results.csv"
PLOT_PNG = "sweep_plot.png"
TABLE_CSV = "sweep_table.csv"
TABLE_MD = "sweep_table.md"
HEATMAP_PNG = "sweep_heatmap.png"


@dataclass
class SweepResults:
    """The settings and finished points of a sweep, stored in ``sweep_results.json``.

    ``reference``: the reference distribution of the label-free statistics when it came from a
    reference task (``{"task", "distribution", "n"}``); ``select``: which pick :meth:`selected`
    returns (``"labelled"``: :meth:`best`, ``"label-free"``: :meth:`best_label_free`);
    ``label_free_rule``: a key of :data:`LABEL_FREE_RULES`.
    """

    settings: dict[str, Any]
    points: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    select: str = "labelled"
    label_free_rule: str = DEFAULT_LABEL_FREE_RULE

    def __post_init__(self) -> None:
        if self.select not in SELECT_CHOICES:
            raise ValueError(f"select must be one of {list(SELECT_CHOICES)}, got {self.select!r}")
        if self.label_free_rule not in LABEL_FREE_RULES:
            raise ValueError(f"label_free_rule must be one of {list(LABEL_FREE_RULES)}, got {self.label_free_rule!r}")

    def done(self) -> set[str]:
        return {p["key"] for p in self.points}

    def langs(self) -> list[str | None]:
        """The target languages of the points, in order (``[None]`` for a sweep without codes)."""
        return list(dict.fromkeys(p.get("lang") for p in self.points))

    def columns(self) -> list[str]:
        """The (method, t) columns of the points, in order (``adamergex@0.5``, ``task_only``)."""
        return list(dict.fromkeys(SweepPoint(p["method"], p["t"]).column for p in self.points))

    def _of_lang(self, lang: Any) -> list[dict[str, Any]]:
        return list(self.points) if lang is ALL_LANGS else [p for p in self.points if p.get("lang") == lang]

    def _best_column(self, value: Callable[[dict], Any], higher: bool, name: str) -> dict[str, Any] | None:
        """Several languages: the (method, t) with the best mean ``value`` over the languages that all have it."""
        langs = self.langs()
        by_column: dict[str, dict[Any, Any]] = {}
        example: dict[str, dict[str, Any]] = {}
        for p in self.points:
            column = SweepPoint(p["method"], p["t"]).column
            by_column.setdefault(column, {})[p.get("lang")] = value(p)
            example.setdefault(column, p)
        rows = []
        for column, values in by_column.items():
            if all(is_finite_number(values.get(lang)) for lang in langs):
                mean = sum(values[lang] for lang in langs) / len(langs)
                rows.append(
                    {
                        "key": column,
                        "method": example[column]["method"],
                        "t": example[column]["t"],
                        "lang": None,
                        name: mean,
                        "per_lang": {str(lang): values[lang] for lang in langs},
                    }
                )
        return first_best(rows, lambda r: r[name], higher)

    def best(self, lang: Any = ALL_LANGS) -> dict[str, Any] | None:
        """The point with the highest score (the first one on ties), or ``None``.

        With several languages and no ``lang``: the (method, t) with the highest mean score over
        the languages (``{"key", "method", "t", "score", "per_lang"}``).
        """
        if lang is ALL_LANGS and len(self.langs()) > 1:
            return self._best_column(lambda p: p.get("score"), True, "score")
        return first_best(self._of_lang(lang), lambda p: p.get("score"), True)

    def best_label_free(self, lang: Any = ALL_LANGS, rule: str | None = None) -> dict[str, Any] | None:
        """The point a label-free rule picks (:data:`LABEL_FREE_RULES`; ties: the first), or ``None``.

        Reads only the points' ``label_free`` statistics, never a score or label. With several
        languages and no ``lang``: the (method, t) with the best mean statistic over the languages.
        """
        spec = LABEL_FREE_RULES[rule or self.label_free_rule]
        value = label_free_value(spec.statistic)
        if lang is ALL_LANGS and len(self.langs()) > 1:
            return self._best_column(value, spec.higher_is_better, spec.statistic)
        return first_best(self._of_lang(lang), value, spec.higher_is_better)

    def selected(self, lang: Any = ALL_LANGS) -> dict[str, Any] | None:
        """:meth:`best` or :meth:`best_label_free`, as ``select`` says."""
        return self.best(lang) if self.select == "labelled" else self.best_label_free(lang)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "settings": self.settings,
            "points": self.points,
            "best": self.best(),
            "best_label_free": self.best_label_free(),
            "label_free_rule": self.label_free_rule,
            "select": self.select,
            "selected": self.selected(),
        }
        if self.reference is not None:
            data["reference"] = self.reference
        langs = self.langs()
        if langs and langs != [None]:
            data["best_per_lang"] = {str(lang): self.best(lang) for lang in langs}
            data["best_label_free_per_lang"] = {str(lang): self.best_label_free(lang) for lang in langs}
        return data

    @classmethod
    def load(cls, path: Path) -> SweepResults:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(settings=data["settings"], points=list(data["points"]), reference=data.get("reference"))

    def save(self, output_dir: Path, plot: bool = True) -> None:
        """Write the JSON, the CSVs and the Markdown table (and the PNGs) atomically."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / RESULTS_JSON, json.dumps(self.to_dict(), indent=2) + "\n")
        atomic_write_text(output_dir / RESULTS_CSV, self.to_csv())
        atomic_write_text(output_dir / TABLE_CSV, self.table_csv())
        atomic_write_text(output_dir / TABLE_MD, self.table_md())
        if plot and self.points:
            atomic_write_bytes(output_dir / PLOT_PNG, self.plot_png())
            atomic_write_bytes(output_dir / HEATMAP_PNG, self.heatmap_png())

    def save_shard(self, path: Path) -> None:
        """Write this rank's settings, points and reference to ``path`` atomically (a sharded sweep)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        data = {"settings": self.settings, "points": self.points, "reference": self.reference}
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")

    def to_csv(self) -> str:
        task_names = sorted({t for p in self.points for t in p.get("chosen", {})})
        with_lang = self.langs() not in ([], [None])
        extra = ("calibrated_score", "tv", "entropy", "calibrated_confidence")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*(["lang"] if with_lang else []), "method", "t", "score", *task_names, *extra])
        for p in self.points:
            row = [*([p.get("lang")] if with_lang else []), p["method"], "" if p["t"] is None else p["t"], p["score"]]
            row += [p.get("chosen", {}).get(t, {}).get("value", "") for t in task_names]
            row += [_blank(p.get("calibrated_score"))]
            row += [_blank((p.get("label_free") or {}).get(s)) for s in extra[1:]]
            writer.writerow(row)
        return buffer.getvalue()

    def _measures(self) -> list[tuple[str, Callable[[dict], Any]]]:
        measures: list[tuple[str, Callable[[dict], Any]]] = [("score", lambda p: p.get("score"))]
        if any(is_finite_number(p.get("calibrated_score")) for p in self.points):
            measures.append(("calibrated_score", lambda p: p.get("calibrated_score")))
        for stat in ("tv", "entropy", "calibrated_confidence"):
            if any(is_finite_number(label_free_value(stat)(p)) for p in self.points):
                measures.append((stat, label_free_value(stat)))
        return measures

    def _grid(self, value: Callable[[dict], Any]) -> dict[Any, dict[str, Any]]:
        grid: dict[Any, dict[str, Any]] = {lang: {} for lang in self.langs()}
        for p in self.points:
            grid[p.get("lang")][SweepPoint(p["method"], p["t"]).column] = value(p)
        return grid

    def table_csv(self) -> str:
        """Languages x (method, t), one block of rows per measure (score, calibrated score, label-free statistics)."""
        columns = self.columns()
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["lang", "measure", *columns])
        for name, value in self._measures():
            grid = self._grid(value)
            for lang in self.langs():
                writer.writerow([lang_label(lang), name, *(_blank(grid[lang].get(c)) for c in columns)])
        return buffer.getvalue()

    def table_md(self) -> str:
        """Markdown: one languages x (method, t) table per measure; per language the best score in
        bold and the label-free pick marked with a dagger."""
        if not self.points:
            return "_The sweep has no evaluated points._\n"
        columns = self.columns()
        rule = LABEL_FREE_RULES[self.label_free_rule]
        lines = []
        for name, value in self._measures():
            grid = self._grid(value)
            lines += [f"### {name}", "", "| lang | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
            for lang in self.langs():
                best = self.best(lang)
                picked = self.best_label_free(lang)
                cells = []
                for c in columns:
                    v = grid[lang].get(c)
                    text = "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
                    if name == "score" and best is not None and SweepPoint(best["method"], best["t"]).column == c:
                        text = f"**{text}**"
                    if (
                        name == "score"
                        and picked is not None
                        and SweepPoint(picked["method"], picked["t"]).column == c
                    ):
                        text += " †"
                    cells.append(text)
                lines.append(f"| {lang_label(lang)} | " + " | ".join(cells) + " |")
            lines.append("")
        lines.append(
            f"Bold: the best score per language (labelled). †: the label-free pick ({self.label_free_rule}: "
            f"{rule.description})."
        )
        return "\n".join(lines) + "\n"

    def plot_png(self) -> bytes:
        """Score (and, where measured, calibrated score) against t (:func:`~adamergex_peft.sweep.plots.plot_png`)."""
        return _plot_png(self)

    def heatmap_png(self) -> bytes:
        """The score table as a heat map (:func:`~adamergex_peft.sweep.plots.heatmap_png`)."""
        return _heatmap_png(self)


def _blank(value: Any) -> Any:
    return "" if value is None else value
