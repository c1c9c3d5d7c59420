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

    def rows(self) -> list[dict[str, Any]]:
        """Table rows: family, method, per-language scores, mean, share of the gap closed."""
        return table_rows(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "source": self.source,
            "targets": self.targets,
            "scores": self.scores,
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


def table_rows(result: DemoResult) -> list[dict[str, Any]]:
    """One row per (family, method): per-language accuracy, mean, and the gap share on the mean."""
    rows = []
    for family, table in result.scores.items():
        means = {
            method: None if any(x is None for x in v.values()) else sum(v.values()) / len(v)
            for method, v in table.items()
        }
        for method, per_lang in table.items():
            share = None
            if None not in (means[method], means["task_only"], means["oracle"]):
                share = gap_share(means[method], means["task_only"], means["oracle"])
            rows.append(
                {
                    "family": family,
                    "method": method,
                    "scores": dict(per_lang),
                    "mean": means[method],
                    "gap_closed": share,
                }
            )
    return rows
