"""Picking a point: the label-free rules, the ``select`` choices and first-best-with-tolerance."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple


class LabelFreeRule(NamedTuple):
    """A label-free rule to pick a point: the ``label_free`` statistic it reads and its direction."""

    statistic: str
    higher_is_better: bool
    description: str


#: The rules ``select="label-free"`` can use (see :mod:`adamergex_peft.sweep` for the default).
LABEL_FREE_RULES: Mapping[str, LabelFreeRule] = {
    "calibrated_confidence": LabelFreeRule(
        "calibrated_confidence", True, "highest mean probability of the calibrated prediction"
    ),
    "least_prior_shift": LabelFreeRule("tv", False, "smallest total-variation distance of the plain predictions"),
}
DEFAULT_LABEL_FREE_RULE = "calibrated_confidence"
SELECT_CHOICES = ("labelled", "label-free")
#: ``lang`` left out in a pick (:meth:`SweepResults.best`): every language (``None`` is the one language without a code).
ALL_LANGS = object()
#: Values this close (relative to the best, at least 1e-6 absolute) count as ties when picking a
#: point: a cell's numbers carry the round-off of the merges undone before it on the same model
#: (about 1e-7 relative in float32), so ``t = 0`` and ``task_only`` (the same model) must tie.
TIE_TOLERANCE = 1e-6


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def first_best(points: Sequence[dict[str, Any]], value: Callable[[dict], Any], higher: bool) -> dict | None:
    """The point with the best finite ``value``; values within :data:`TIE_TOLERANCE` of it tie, and the
    first of them in order wins. ``None`` when no point has a value."""
    scored = [(value(p), i) for i, p in enumerate(points) if is_finite_number(value(p))]
    if not scored:
        return None
    best = max(v for v, _ in scored) if higher else min(v for v, _ in scored)
    tolerance = TIE_TOLERANCE * max(1.0, abs(best))
    return points[min(i for v, i in scored if abs(v - best) <= tolerance)]


def label_free_value(statistic: str) -> Callable[[dict], Any]:
    return lambda p: (p.get("label_free") or {}).get(statistic)
