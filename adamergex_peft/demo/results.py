"""What the demo measured: :class:`DemoResult`, its table rows, and the names of its output files.

A leaf module (no torch, no other demo module), shared by :mod:`.pipeline` and :mod:`.report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Methods of the table, in order; "oracle" and "base" are not merges.
MERGE_METHODS: tuple[str, ...] = ("task_only", "task_plus_target", "arimerge", "cross", "adamergex")
RESULTS_JSON = "demo_results.json"
CHART_PNG = "demo_results.png"
TABLE_TXT = "demo_table.txt"


@dataclass
class DemoResult:
    """Everything :func:`~adamergex_peft.demo.pipeline.run_demo` measured (also written to ``demo_results.json``)."""

    settings: dict[str, Any]
    source: str
    targets: list[str]
    scores: dict[str, dict[str, dict[str, float | None]]]  # family -> row -> lang -> accuracy (None: merge refused)
    source_scores: dict[str, float]  # family -> task adapter's accuracy on the source test set
    training: dict[str, Any]
    timings: dict[str, float]
    errors: list[dict[str, str]] = field(default_factory=list)
    #: family -> row -> lang -> accuracy after label-free calibration of the answer prior (acc_calibrated)
    calibrated_scores: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """Table rows: family, method, per-language scores, mean, share of the gap closed."""
        return table_rows(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "source": self.source,
            "targets": self.targets,
            "scores": self.scores,
            "calibrated_scores": self.calibrated_scores,
            "source_scores": self.source_scores,
            "table": self.rows(),
            "training": self.training,
            "timings": self.timings,
            "errors": self.errors,
        }


def gap_share(score: float, task_only: float, oracle: float) -> float | None:
    """Share of the task_only-to-oracle gap that ``score`` closes; ``None`` if there is no gap."""
    gap = oracle - task_only
    if gap <= 1e-9:
        return None
    return (score - task_only) / gap


def _means(table: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    return {
        method: None if not v or any(x is None for x in v.values()) else sum(v.values()) / len(v)
        for method, v in table.items()
    }


def _share(means: dict[str, float | None], method: str) -> float | None:
    if None in (means.get(method), means.get("task_only"), means.get("oracle")):
        return None
    return gap_share(means[method], means["task_only"], means["oracle"])


def table_rows(result: DemoResult) -> list[dict[str, Any]]:
    """One row per (family, method): per-language accuracy, mean, and the gap share on the mean; the
    same for the accuracy after label-free calibration (``calibrated_*``; ``None`` where not measured)."""
    rows = []
    for family, table in result.scores.items():
        cal_table = result.calibrated_scores.get(family, {})
        means, cal_means = _means(table), _means(cal_table)
        for method, per_lang in table.items():
            rows.append(
                {
                    "family": family,
                    "method": method,
                    "scores": dict(per_lang),
                    "mean": means[method],
                    "gap_closed": _share(means, method),
                    "calibrated_scores": dict(cal_table.get(method, {})),
                    "calibrated_mean": cal_means.get(method),
                    "calibrated_gap_closed": _share(cal_means, method),
                }
            )
    return rows
