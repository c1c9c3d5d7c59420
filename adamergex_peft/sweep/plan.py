"""The grid of a sweep: its cells (language, method, t), the target references and per-language task names."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from adamergex_peft.methods import get_method

#: ``{lang}`` in a task name is replaced by each target language's code.
LANG_PLACEHOLDER = "{lang}"
_LANG_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class SweepPoint:
    """One merge to evaluate: a method, (for methods that use it) a value of ``t``, and a target language.

    ``lang=None``: the one target reference of a single-language sweep (keys as before).
    """

    method: str
    t: float | None
    lang: str | None = None

    @property
    def column(self) -> str:
        """The (method, t) part of the key: ``adamergex@0.5`` or ``task_only``."""
        return self.method if self.t is None else f"{self.method}@{self.t:g}"

    @property
    def key(self) -> str:
        return self.column if self.lang is None else f"{self.lang}:{self.column}"


def plan_points(
    methods: Sequence[str], t_values: Sequence[float], langs: Sequence[str | None] | None = None
) -> list[SweepPoint]:
    """The cells of a sweep, in order: per language, per method, per t.

    Methods that do not use t (``METHODS[m].uses_t``) appear once per language, with ``t=None``.
    ``langs=None`` is one language without a code (``lang=None``).
    """
    if not methods:
        raise ValueError("give at least one method")
    uses_t = {m: get_method(m).uses_t for m in methods}
    if not t_values and any(uses_t.values()):
        raise ValueError("give at least one value of t")
    points: list[SweepPoint] = []
    for lang in dict.fromkeys(langs if langs is not None else [None]):
        for method in dict.fromkeys(methods):
            if not uses_t[method]:
                points.append(SweepPoint(method, None, lang))
            else:
                points.extend(SweepPoint(method, float(t), lang) for t in dict.fromkeys(t_values))
    return points


def parse_target_references(values: str | Sequence[str] | Mapping[str, str]) -> str | dict[str, str]:
    """``PATH`` (one language, as before) or ``LANG=PATH ...`` -> ``{lang: path}``.

    A single value is ``LANG=PATH`` when the text before its first ``=`` is a language code
    (a letter, then letters, digits, ``_`` or ``-``); otherwise it is a path.
    """
    if isinstance(values, Mapping):
        refs = {str(k): str(v) for k, v in values.items()}
    else:
        items = [values] if isinstance(values, (str, os.PathLike)) else [str(v) for v in values]
        parsed = []
        for item in items:
            lang, sep, path = str(item).partition("=")
            parsed.append((lang, path) if sep and _LANG_RE.fullmatch(lang) and path else None)
        if len(items) == 1 and parsed[0] is None:
            return str(items[0])
        bad = [item for item, p in zip(items, parsed) if p is None]
        if bad:
            raise ValueError(f"target references must all be LANG=PATH when several are given, got {bad[0]!r}")
        refs = dict(parsed)
        if len(refs) != len(parsed):
            raise ValueError("a target language is given twice in the target references")
    if not refs:
        raise ValueError("give at least one target reference")
    for lang in refs:
        if not _LANG_RE.fullmatch(lang):
            raise ValueError(f"bad language code {lang!r}: a letter, then letters, digits, '_' or '-'")
    return refs


def tasks_for_lang(tasks: Sequence[str], lang: str | None) -> list[str]:
    """The task names of one language: ``{lang}`` replaced by its code."""
    if lang is None:
        if any(LANG_PLACEHOLDER in t for t in tasks):
            raise ValueError(f"a task name holds {LANG_PLACEHOLDER} but the target reference names no language")
        return list(tasks)
    return [t.replace(LANG_PLACEHOLDER, lang) for t in tasks]


def lang_label(lang: str | None) -> str:
    return "target" if lang is None else lang
