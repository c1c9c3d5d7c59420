"""Choose ``t``: merge at several values, evaluate each through lm-evaluation-harness, keep the best.

:func:`run_sweep` loads the base model once with the adapters in one ``PeftModel``: the task
adapter, the source reference and one target reference per target language. For every *cell*
(target language, method, t) it adds the merged update into the base weights in place
(:func:`adamergex_peft.merge_crosslingual_into_base`), evaluates the base model with the adapters
disabled through lm-eval's Python API (an ``HFLM`` wrapped around the in-memory model), and takes
the update out again (``handle.undo()``). Methods that do not use ``t`` (``METHODS[m].uses_t``
false: ``task_only``, ``arimerge``) are evaluated once per language.

**Languages.** ``target_reference`` is one adapter folder (one target language, as before) or a
mapping ``{lang: folder}``; ``{lang}`` in a task name is replaced by each language's code
(``adamergex_xcopa_mc_{lang}``). Every point then records its ``lang``.

**Outputs** in ``output_dir`` (rewritten atomically after every cell, so an interrupted sweep
resumes from the cells already done):

* ``sweep_results.json``: the settings; per point the language, method, ``t``, the score, every
  task's metrics, the calibrated metrics and the label-free statistics (below); at the top level
  ``best`` and ``best_label_free`` (for several languages: the (method, t) with the best mean over
  the languages, and both per language in ``best_per_lang`` / ``best_label_free_per_lang``);
  ``selected`` (one of the two, as ``select`` says) and, with a reference task, ``reference``;
* ``sweep_results.csv``: one row per point;
* ``sweep_plot.png``: score and calibrated score against ``t``, one line per method (and language);
* ``sweep_table.csv`` / ``sweep_table.md``: languages x (method, t);
* ``sweep_heatmap.png``: the score table as a heat map.

The score of a point is the mean over the requested tasks of one metric per task: ``metric`` if
given, else the first of ``acc``, ``exact_match``, ``rougeL``, ``f1``, ``bleu`` that the task
reports, else its first numeric metric.

**Label-free statistics** (multiple-choice tasks; lm-eval's per-item choice log-likelihoods
``L`` (n x k), read from its logged samples, which are not stored). Per task, reading no labels:

* ``distribution``: the shares of the plain predictions ``argmax_j L[i, j]``
  (:func:`~adamergex_peft.calibration.predicted_distribution`);
* ``tv``: their total-variation distance ``1/2 sum_j |p_j - r_j|`` to the reference ``r``:
  uniform, or (``reference_task``) the shares the task adapter alone (the ``task_only`` merge)
  predicts on a source-language task, evaluated once per sweep and stored under ``reference``
  (:func:`~adamergex_peft.calibration.least_prior_shift`);
* ``entropy``: the mean entropy of the normalised choice probabilities ``softmax(L[i])``
  (:func:`~adamergex_peft.calibration.mean_choice_entropy`);
* ``calibrated_confidence``: the mean probability of the calibrated prediction,
  ``1/n sum_i max_j softmax_j(L[i] + b)`` with ``b`` the label-free offsets that make the
  predicted shares match ``r`` (:func:`~adamergex_peft.calibration.calibrated_confidence`).

Each point's ``label_free`` holds them per task and their means over tasks. The *labelled*
calibrated metrics sit with the other labelled ones: ``calibrated`` (per task ``acc_calibrated``:
the accuracy of the predictions calibrated to ``r``, and ``auc`` for two choices) and
``calibrated_score`` (the mean ``acc_calibrated``).

**Choosing t without target labels** (``select="label-free"``): :data:`LABEL_FREE_RULES`. The
default rule is ``calibrated_confidence`` (highest wins): the sweep's calibrated score is what the
language-gap update improves (issue 10: AUC and calibrated accuracy rise with ``t`` while the plain
answer prior drifts), and this rule scores the calibrated predictions, so it is not fooled by the
prior shift. ``least_prior_shift`` (smallest ``tv`` wins) keeps the merge whose *uncalibrated*
answers look most like the reference: the rule for a merge deployed without calibration; it
favours small ``t`` whenever the update shifts the prior. Ties (equal up to :data:`TIE_TOLERANCE`,
the round-off of merge/undo) go to the first point in plan order.
Which rule (and which ``select``) is the better default is an empirical question (BENCHMARKS.md);
``select`` defaults to ``"labelled"`` for now.

**Several processes** (one node or several): launch the same command under ``torchrun`` or
``accelerate launch``. The environment variables ``RANK`` and ``WORLD_SIZE`` (both launchers set
them) split the grid's cells round-robin over the ranks (cell ``i`` of the plan goes to rank
``i % WORLD_SIZE``). Every rank loads its own model copy (on ``cuda:LOCAL_RANK`` when CUDA is
there and no ``device`` is given), evaluates whole cells (lm-eval sees one process: the model
object is passed to ``HFLM``, which then uses no data parallelism of its own) and writes its
finished cells atomically to ``output_dir/.shards/rank<k>.json``. Rank 0 then waits for every
planned cell to be in some shard file (a ``torch.distributed`` barrier first, if a process group
is initialised), gathers them and writes the usual outputs. An interrupted run resumes on any
number of ranks: cells found in ``sweep_results.json`` or any shard file are skipped. Several
nodes need ``output_dir`` on a filesystem every node sees (NFS, Lustre, ...), with atomic
``rename``; the model and adapter folders must be readable on every node.

    # 8 GPUs, one node
    torchrun --nproc_per_node 8 -m adamergex_peft sweep ... --output OUT
    accelerate launch --multi_gpu --num_processes 8 -m adamergex_peft sweep ... --output OUT
    # 2 nodes x 8 GPUs (OUT on a shared filesystem); on node NODE (0 or 1), HEAD = node 0's address:
    torchrun --nnodes 2 --node_rank $NODE --nproc_per_node 8 --master_addr $HEAD --master_port 29500 \\
        -m adamergex_peft sweep ... --output OUT
    accelerate launch --multi_gpu --num_machines 2 --machine_rank $NODE --num_processes 16 \\
        --main_process_ip $HEAD --main_process_port 29500 -m adamergex_peft sweep ... --output OUT

(``accelerate config`` can store the launch settings instead.) Rank 0 polls the shard files, so
on NFS a finished rank's file may show after the client's attribute-cache delay (seconds).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from adamergex_peft.atomic import atomic_write_bytes, atomic_write_text
from adamergex_peft.config import ADAPTER_FIELDS, DEFAULT_ADAPTER_NAMES, AdaMergeXConfig
from adamergex_peft.errors import AdaMergeXError
from adamergex_peft.methods import get_method

logger = logging.getLogger(__name__)

RESULTS_JSON = "sweep_results.json"
RESULTS_CSV = "sweep_results.csv"
PLOT_PNG = "sweep_plot.png"
TABLE_CSV = "sweep_table.csv"
TABLE_MD = "sweep_table.md"
HEATMAP_PNG = "sweep_heatmap.png"
SHARDS_DIR = ".shards"
REFERENCE_JSON = "reference.json"
PREFERRED_METRICS = ("acc", "exact_match", "rougeL", "f1", "bleu")
#: Names of the task, source-reference and target-reference adapters in the sweep's PeftModel.
ADAPTER_NAMES: tuple[str, str, str] = tuple(DEFAULT_ADAPTER_NAMES[f] for f in ADAPTER_FIELDS)
#: ``{lang}`` in a task name is replaced by each target language's code.
LANG_PLACEHOLDER = "{lang}"
_LANG_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


class LabelFreeRule(NamedTuple):
    """A label-free rule to pick a point: the ``label_free`` statistic it reads and its direction."""

    statistic: str
    higher_is_better: bool
    description: str


#: The rules ``select="label-free"`` can use (see the module docstring for the default).
LABEL_FREE_RULES: Mapping[str, LabelFreeRule] = {
    "calibrated_confidence": LabelFreeRule(
        "calibrated_confidence", True, "highest mean probability of the calibrated prediction"
    ),
    "least_prior_shift": LabelFreeRule("tv", False, "smallest total-variation distance of the plain predictions"),
}
DEFAULT_LABEL_FREE_RULE = "calibrated_confidence"
SELECT_CHOICES = ("labelled", "label-free")


def __getattr__(name: str):
    if name == "T_FREE_METHODS":  # deprecated: read ``METHODS[m].uses_t``
        from adamergex_peft.methods import METHODS

        return frozenset(m for m, method in METHODS.items() if not method.uses_t)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _pick_metric(task_metrics: Mapping[str, Any], metric: str | None) -> tuple[str, float] | None:
    values = {}
    for key, value in task_metrics.items():
        name, _, _filter = key.partition(",")
        if name.endswith("_stderr") or name == "alias" or not isinstance(value, (int, float)):
            continue
        values.setdefault(name, float(value))
    if not values:
        return None
    if metric is not None:
        return (metric, values[metric]) if metric in values else None
    for name in PREFERRED_METRICS:
        if name in values:
            return name, values[name]
    name = next(iter(values))
    return name, values[name]


def summarize_lm_eval(results: Mapping[str, Any], tasks: Sequence[str], metric: str | None = None) -> dict[str, Any]:
    """Reduce an ``lm_eval.simple_evaluate`` result to ``{"score", "metric", "tasks": {...}}``.

    Every requested task (or group) contributes its chosen metric; a requested name that has no
    entry of its own contributes the mean of its sub-tasks' entries (those named ``<name>...``).
    """
    per_task = {name: dict(v) for name, v in (results.get("results") or {}).items()}
    per_task.update({name: dict(v) for name, v in (results.get("groups") or {}).items()})
    chosen: dict[str, dict[str, Any]] = {}
    for task in tasks:
        picked = _pick_metric(per_task.get(task, {}), metric)
        if picked is None:
            subs = [_pick_metric(v, metric) for k, v in per_task.items() if k != task and k.startswith(task)]
            subs = [s for s in subs if s is not None]
            if not subs:
                raise ValueError(f"lm-eval returned no {'metric ' + metric if metric else 'metric'} for task {task!r}")
            picked = (subs[0][0], sum(s[1] for s in subs) / len(subs))
        chosen[task] = {"metric": picked[0], "value": picked[1]}
    score = sum(c["value"] for c in chosen.values()) / len(chosen)
    clean = {
        name: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, metrics in per_task.items()
    }
    return {"score": score, "chosen": chosen, "tasks": clean}


def choice_logliks(samples: Sequence[Mapping[str, Any]], choices: Callable[[Any], Sequence[str]] | None = None):
    """Per-item choice log-likelihoods (and gold indices) from lm-eval's logged samples of one task.

    ``samples``: ``results["samples"][task]`` of ``lm_eval.evaluator.evaluate(..., log_samples=True)``
    for a multiple-choice task (per item ``filtered_resps``: one ``(loglikelihood, is_greedy)`` per
    choice; with ``choices``, only the first ``len(choices(doc))``, as ``acc_mutual_info`` adds
    unconditional ones). Items are ordered by ``doc_id``; only the first filter is read.

    Returns:
        ``(L, golds)``: an (n, k) float64 tensor, and the gold indices (list of int; an item whose
        target is neither an index nor one of ``choices(doc)`` gets -100, scored wrong), or
        ``None`` when the items have different numbers of choices or are not log-likelihoods.
    """
    import torch

    if not samples:
        return None
    first_filter = samples[0].get("filter")
    rows = sorted((s for s in samples if s.get("filter") == first_filter), key=lambda s: s["doc_id"])
    lls, golds = [], []
    for s in rows:
        resps = list(s["filtered_resps"])
        options = list(choices(s["doc"])) if choices is not None and "doc" in s else None
        if options:  # acc_mutual_info appends one unconditional request per choice: keep the k conditional ones
            resps = resps[: len(options)]
        try:
            lls.append([float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in resps])
        except (TypeError, ValueError):
            return None
        target = s.get("target")
        if isinstance(target, bool) or not isinstance(target, (int, str)):
            golds.append(-100)
        elif isinstance(target, int):
            golds.append(target)
        else:
            golds.append(options.index(target) if options and target in options else -100)
    if len({len(r) for r in lls}) != 1 or len(lls[0]) < 2:
        return None
    return torch.tensor(lls, dtype=torch.float64), golds


def label_free_statistics(loglik, reference: Sequence[float] | None = None) -> dict[str, Any]:
    """The label-free statistics of one task's choice log-likelihoods (module docstring); reads no labels."""
    from adamergex_peft import calibration as cal

    n, k = loglik.shape
    if reference is not None and len(reference) != k:
        raise ValueError(f"the reference distribution has {len(reference)} classes, the task {k} choices")
    return {
        "n": int(n),
        "k": int(k),
        "distribution": cal.predicted_distribution(loglik).tolist(),
        "tv": cal.least_prior_shift([loglik], reference)[1][0],
        "entropy": cal.mean_choice_entropy(loglik),
        "calibrated_confidence": cal.calibrated_confidence([loglik], reference)[1][0],
    }


def calibrated_metrics(loglik, golds: Sequence[int], reference: Sequence[float] | None = None) -> dict[str, Any]:
    """Labelled: ``acc_calibrated`` (predictions calibrated to ``reference`` without labels, then scored)
    and, for two choices, ``auc`` (``None`` where undefined)."""
    from adamergex_peft import calibration as cal

    items = [(int(g), row) for g, row in zip(golds, loglik.tolist())]
    out: dict[str, Any] = {"acc_calibrated": cal.calibrated_accuracy_of_items(items, reference)}
    if loglik.shape[1] == 2:
        try:
            out["auc"] = cal.binary_auc_of_items(items)
        except ValueError:
            out["auc"] = None
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize_samples(
    samples: Mapping[str, Sequence[Mapping[str, Any]]],
    task_objects: Mapping[str, Any] | None = None,
    reference: Sequence[float] | None = None,
    reference_name: str = "uniform",
) -> dict[str, Any]:
    """``{"label_free": ..., "calibrated": ..., "calibrated_score": ...}`` from lm-eval's logged samples.

    Multiple-choice tasks only (others are left out; ``label_free`` is ``None`` when none is left).
    The label-free part is computed before the labels are read, from the log-likelihoods alone.
    """
    task_objects = task_objects or {}
    per_task, calibrated = {}, {}
    for name, task_samples in samples.items():
        task = task_objects.get(name)
        if task is not None and task.get_config("output_type") != "multiple_choice":
            continue
        found = choice_logliks(task_samples, getattr(task, "doc_to_choice", None))
        if found is None:
            continue
        loglik, golds = found
        per_task[name] = label_free_statistics(loglik, reference)
        calibrated[name] = calibrated_metrics(loglik, golds, reference)
    if not per_task:
        return {"label_free": None, "calibrated": {}, "calibrated_score": None}
    label_free: dict[str, Any] = {"reference": reference_name}
    for stat in ("tv", "entropy", "calibrated_confidence"):
        label_free[stat] = _mean([s[stat] for s in per_task.values()])
    label_free["tasks"] = per_task
    return {
        "label_free": label_free,
        "calibrated": calibrated,
        "calibrated_score": _mean([c["acc_calibrated"] for c in calibrated.values()]),
    }


def pooled_distribution(label_free: Mapping[str, Any]) -> dict[str, Any]:
    """The predicted shares pooled over a point's tasks (weighted by items): the reference of a sweep."""
    tasks = list((label_free or {}).get("tasks", {}).values())
    if not tasks:
        raise ValueError("the reference task reported no multiple-choice log-likelihoods")
    ks = {t["k"] for t in tasks}
    if len(ks) != 1:
        raise ValueError(f"the reference task's sub-tasks have different numbers of choices: {sorted(ks)}")
    n = sum(t["n"] for t in tasks)
    k = ks.pop()
    shares = [sum(t["distribution"][j] * t["n"] for t in tasks) / n for j in range(k)]
    total = sum(shares)
    return {"distribution": [s / total for s in shares], "n": n}


def make_evaluator(
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | Sequence[str] | None = None,
    include_defaults: bool | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    metric: str | None = None,
    seed: int = 1234,
    gen_kwargs: str | dict | None = None,
    verbosity: str | None = None,
    progress: bool = True,
    label_free: bool = False,
    reference: Sequence[float] | None = None,
    reference_name: str = "uniform",
    task_manager=None,
) -> Callable[[Any], dict[str, Any]]:
    """Return ``evaluate(model) -> summary`` running lm-eval's Python API on an in-memory model.

    The tasks are indexed and loaded once (with their data), then every call wraps the model in
    an ``HFLM`` and runs ``lm_eval.evaluator.evaluate``, the function ``simple_evaluate`` calls,
    after applying the same per-task settings ``simple_evaluate`` applies (``num_fewshot``,
    ``gen_kwargs``, the seeds). This skips what ``simple_evaluate`` redoes on every call and a
    sweep does not need: re-indexing and re-loading the tasks, and collecting the environment
    report (about 1.5 s per call here, the bulk of a small model's evaluation).

    ``include_defaults`` defaults to ``False`` when ``include_path`` is given and every requested
    task is found there (skipping lm-eval's ~10k built-in tasks), else ``True``. ``verbosity``
    (e.g. ``"ERROR"``) is passed to lm-eval, which sets its own loggers' level with it;
    ``progress=False`` hides lm-eval's per-request progress bars. ``task_manager``: an
    ``lm_eval.tasks.TaskManager`` to reuse (several evaluators, one index).

    ``label_free=True`` asks lm-eval for its per-item samples (``log_samples``; they are reduced
    at once and not kept) and adds :func:`summarize_samples` to the summary, with ``reference``
    (``None``: uniform; named ``reference_name``) as the reference distribution.
    """
    import random

    import numpy as np
    import torch
    from adamergex_lm_eval.selective_logits import SelectiveLogitsHFLM
    from lm_eval.evaluator import evaluate as lm_eval_evaluate
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    if not tasks:
        raise ValueError("give at least one lm-eval task")
    if task_manager is None and include_defaults is None:
        include_defaults = True
        if include_path:
            local = TaskManager(include_path=include_path, include_defaults=False)
            if all(t in local.all_tasks for t in tasks):
                include_defaults, task_manager = False, local
    if task_manager is None:
        task_manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; check --tasks and --include-path")
    loaded = task_manager.load(tasks)
    for task_obj in loaded["tasks"].values():  # as lm_eval.simple_evaluate does
        if gen_kwargs is not None and task_obj.get_config("output_type") == "generate_until":
            task_obj.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
        if num_fewshot is not None and task_obj.get_config("num_fewshot") != 0:
            task_obj.set_config(key="num_fewshot", value=num_fewshot)
        elif task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=seed)

    lm_class = SelectiveLogitsHFLM if progress else _quiet_hflm_class()
    reference = None if reference is None else [float(x) for x in reference]

    def evaluate(model) -> dict[str, Any]:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        # The model object (not a name): HFLM then assumes one process (rank 0 of 1), so a sharded
        # sweep's ranks each evaluate whole cells and lm-eval adds no data parallelism of its own.
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval_evaluate(
            lm=lm,
            task_dict=loaded,
            limit=limit,
            bootstrap_iters=0,
            log_samples=label_free,
            verbosity=verbosity or "WARNING",
        )
        if results is None:  # pragma: no cover - only on non-zero ranks
            raise RuntimeError("lm-eval returned no results")
        summary = summarize_lm_eval(results, tasks, metric)
        if label_free:
            samples = results.pop("samples", None) or {}
            summary.update(summarize_samples(samples, loaded["tasks"], reference, reference_name))
        return summary

    return evaluate


def _quiet_hflm_class():
    """``HFLM`` with its request progress bars off (``evaluate`` calls them without ``disable_tqdm``)."""
    from adamergex_lm_eval.selective_logits import SelectiveLogitsHFLM

    class QuietHFLM(SelectiveLogitsHFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


_ALL = object()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: Values this close (relative to the best, at least 1e-6 absolute) count as ties when picking a
#: point: a cell's numbers carry the round-off of the merges undone before it on the same model
#: (about 1e-7 relative in float32), so ``t = 0`` and ``task_only`` (the same model) must tie.
TIE_TOLERANCE = 1e-6


def _first_best(points: Sequence[dict[str, Any]], value: Callable[[dict], Any], higher: bool) -> dict | None:
    """The point with the best finite ``value``; values within :data:`TIE_TOLERANCE` of it tie, and the
    first of them in order wins. ``None`` when no point has a value."""
    scored = [(value(p), i) for i, p in enumerate(points) if _finite(value(p))]
    if not scored:
        return None
    best = max(v for v, _ in scored) if higher else min(v for v, _ in scored)
    tolerance = TIE_TOLERANCE * max(1.0, abs(best))
    return points[min(i for v, i in scored if abs(v - best) <= tolerance)]


def _label_free_value(statistic: str) -> Callable[[dict], Any]:
    return lambda p: (p.get("label_free") or {}).get(statistic)


def _lang_label(lang: str | None) -> str:
    return "target" if lang is None else lang


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
        return list(self.points) if lang is _ALL else [p for p in self.points if p.get("lang") == lang]

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
            if all(_finite(values.get(lang)) for lang in langs):
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
        return _first_best(rows, lambda r: r[name], higher)

    def best(self, lang: Any = _ALL) -> dict[str, Any] | None:
        """The point with the highest score (the first one on ties), or ``None``.

        With several languages and no ``lang``: the (method, t) with the highest mean score over
        the languages (``{"key", "method", "t", "score", "per_lang"}``).
        """
        if lang is _ALL and len(self.langs()) > 1:
            return self._best_column(lambda p: p.get("score"), True, "score")
        return _first_best(self._of_lang(lang), lambda p: p.get("score"), True)

    def best_label_free(self, lang: Any = _ALL, rule: str | None = None) -> dict[str, Any] | None:
        """The point a label-free rule picks (:data:`LABEL_FREE_RULES`; ties: the first), or ``None``.

        Reads only the points' ``label_free`` statistics, never a score or label. With several
        languages and no ``lang``: the (method, t) with the best mean statistic over the languages.
        """
        spec = LABEL_FREE_RULES[rule or self.label_free_rule]
        value = _label_free_value(spec.statistic)
        if lang is _ALL and len(self.langs()) > 1:
            return self._best_column(value, spec.higher_is_better, spec.statistic)
        return _first_best(self._of_lang(lang), value, spec.higher_is_better)

    def selected(self, lang: Any = _ALL) -> dict[str, Any] | None:
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
        if any(_finite(p.get("calibrated_score")) for p in self.points):
            measures.append(("calibrated_score", lambda p: p.get("calibrated_score")))
        for stat in ("tv", "entropy", "calibrated_confidence"):
            if any(_finite(_label_free_value(stat)(p)) for p in self.points):
                measures.append((stat, _label_free_value(stat)))
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
                writer.writerow([_lang_label(lang), name, *(_blank(grid[lang].get(c)) for c in columns)])
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
                lines.append(f"| {_lang_label(lang)} | " + " | ".join(cells) + " |")
            lines.append("")
        lines.append(
            f"Bold: the best score per language (labelled). †: the label-free pick ({self.label_free_rule}: "
            f"{rule.description})."
        )
        return "\n".join(lines) + "\n"

    def plot_png(self) -> bytes:
        """Score (and, where measured, calibrated score) against t, one line per method and language;
        t-free methods as horizontal dashed lines."""
        from matplotlib.figure import Figure

        panels = [("score", "score")]
        if any(_finite(p.get("calibrated_score")) for p in self.points):
            panels.append(("calibrated_score", "calibrated score (acc_calibrated)"))
        fig = Figure(figsize=(6 * len(panels), 4), dpi=100)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        ts = sorted({p["t"] for p in self.points if p["t"] is not None}) or [0.0, 1.0]
        lines = list(dict.fromkeys((p.get("lang"), p["method"]) for p in self.points))
        multi = self.langs() != [None]
        for ax, (measure, title) in zip(axes, panels):
            for index, (lang, method) in enumerate(lines):
                pts = [p for p in self.points if p.get("lang") == lang and p["method"] == method]
                label = f"{lang} {method}" if multi else method
                if pts[0]["t"] is None:
                    value = pts[0].get(measure)
                    if _finite(value):
                        ax.hlines(value, min(ts), max(ts), linestyles="dashed", label=label, colors=f"C{index % 10}")
                    continue
                pts = sorted((p for p in pts if _finite(p.get(measure))), key=lambda p: p["t"])
                if pts:
                    ax.plot(
                        [p["t"] for p in pts],
                        [p[measure] for p in pts],
                        marker="o",
                        label=label,
                        color=f"C{index % 10}",
                    )
            if not multi:
                best = (
                    self.best()
                    if measure == "score"
                    else _first_best(self.points, lambda p, m=measure: p.get(m), True)
                )
                if best is not None and best["t"] is not None and _finite(best.get(measure)):
                    ax.plot(
                        [best["t"]], [best[measure]], marker="*", markersize=14, color="gold", zorder=5, label="best"
                    )
                picked = self.best_label_free()
                if picked is not None and picked["t"] is not None and _finite(picked.get(measure)):
                    ax.plot(
                        [picked["t"]],
                        [picked[measure]],
                        marker="D",
                        markersize=8,
                        markerfacecolor="none",
                        color="black",
                        zorder=6,
                        label=f"label-free pick ({self.label_free_rule})",
                    )
            ax.set_xlabel("t")
            metric_names = sorted({c["metric"] for p in self.points for c in p.get("chosen", {}).values()})
            ax.set_ylabel(f"{title} ({', '.join(metric_names)})" if measure == "score" else title)
            ax.set_title(f"AdaMergeX: {title} against t")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()

    def heatmap_png(self) -> bytes:
        """The score table (languages x (method, t)) as a heat map with the values written in."""
        from matplotlib.figure import Figure

        columns, langs = self.columns(), self.langs()
        grid = self._grid(lambda p: p.get("score"))
        values = [[grid[lang].get(c) if _finite(grid[lang].get(c)) else math.nan for c in columns] for lang in langs]
        fig = Figure(figsize=(max(4.0, 0.9 * len(columns) + 2), max(2.5, 0.5 * len(langs) + 1.5)), dpi=100)
        ax = fig.subplots()
        image = ax.imshow(values, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(columns)), labels=columns, rotation=45, ha="right", fontsize="small")
        ax.set_yticks(range(len(langs)), labels=[_lang_label(lang) for lang in langs])
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
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()


def _blank(value: Any) -> Any:
    return "" if value is None else value


def target_adapter_name(lang: str | None) -> str:
    """The name of a target language's reference adapter in the sweep's PeftModel."""
    return ADAPTER_NAMES[2] if lang is None else f"{ADAPTER_NAMES[2]}_{lang}"


def load_sweep_model(
    base_model: str,
    task_adapter: str,
    source_reference: str,
    target_reference: str | Mapping[str, str],
    *,
    dtype: str = "float32",
    device: str | None = None,
):
    """Load the base model once with the adapters: task and source reference named as in
    :data:`ADAPTER_NAMES`, and the target reference (one folder) or one per language
    (``{lang: folder}``, named :func:`target_adapter_name` ``(lang)``)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import adamergex_peft  # noqa: F401  (attaches the PeftModel methods)

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=getattr(torch, dtype))
    if device is not None:
        base.to(device)
    model = PeftModel.from_pretrained(base, task_adapter, adapter_name=ADAPTER_NAMES[0])
    model.load_adapter(source_reference, adapter_name=ADAPTER_NAMES[1])
    if isinstance(target_reference, Mapping):
        for lang, folder in target_reference.items():
            model.load_adapter(folder, adapter_name=target_adapter_name(lang))
    else:
        model.load_adapter(target_reference, adapter_name=ADAPTER_NAMES[2])
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _merged_evaluation(peft_model, cfg: AdaMergeXConfig, evaluate: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Merge ``cfg`` into the base weights, evaluate the base with the adapters disabled, undo."""
    from adamergex_peft import merge_crosslingual_into_base

    handle = merge_crosslingual_into_base(peft_model, cfg)
    try:
        with peft_model.disable_adapter():
            summary = evaluate(peft_model.get_base_model())
    except BaseException:
        try:
            handle.undo()
        except AdaMergeXError as undo_error:  # keep the evaluation's error, which is the one to see
            logger.error("could not undo the merge of %s after a failed evaluation: %s", cfg.method, undo_error)
        raise
    handle.undo()
    return summary


def evaluate_points(
    peft_model,
    points: Sequence[SweepPoint],
    evaluate: Callable[[Any], dict[str, Any]] | Mapping[str | None, Callable[[Any], dict[str, Any]]],
    results: SweepResults,
    output_dir: Path,
    *,
    adapters: tuple[str, str, str] = ADAPTER_NAMES,
    config_kwargs: Mapping[str, Any] | None = None,
    base_config: AdaMergeXConfig | None = None,
    progress: bool = True,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    plot: bool = True,
    target_adapters: Mapping[str | None, str] | None = None,
    save: Callable[[SweepResults], None] | None = None,
) -> SweepResults:
    """Evaluate the points not yet in ``results``, saving after each one (see :func:`run_sweep`).

    Each point's config is ``base_config`` with the point's ``method`` and ``t`` (``dataclasses.replace``);
    without ``base_config`` it is built from ``adapters`` (the task, source-reference and
    target-reference adapters inside ``peft_model``) and ``config_kwargs``. A point with a
    ``lang`` uses ``target_adapters[lang]`` as its target reference and ``evaluate[lang]`` when
    ``evaluate`` is a mapping by language. ``save(results)`` is called after every point
    (default: ``results.save(output_dir, plot=plot)``; ``plot=False`` skips rewriting the PNGs).
    """
    from tqdm.auto import tqdm

    if base_config is None:
        base_config = AdaMergeXConfig(*adapters, **dict(config_kwargs or {}))
    if save is None:

        def save(res: SweepResults) -> None:
            res.save(output_dir, plot=plot)

    todo = [p for p in points if p.key not in results.done()]
    if len(todo) < len(points):
        logger.info("resuming: %d of %d points already done", len(points) - len(todo), len(points))
    bar = tqdm(todo, desc="sweep", unit="cell", disable=not progress)
    for point in bar:
        bar.set_postfix_str(point.key)
        cfg = dataclasses.replace(base_config, method=point.method, t=1.0 if point.t is None else point.t)
        if target_adapters is not None and point.lang in target_adapters:
            cfg = dataclasses.replace(cfg, target_reference_adapter=target_adapters[point.lang])
        evaluator = evaluate[point.lang] if isinstance(evaluate, Mapping) else evaluate
        summary = _merged_evaluation(peft_model, cfg, evaluator)
        record = {"key": point.key, "method": point.method, "t": point.t}
        if point.lang is not None:
            record["lang"] = point.lang
        record.update(summary)
        results.points.append(record)
        save(results)
        logger.info("%s: score %.4f", point.key, summary["score"])
        if on_point is not None:
            on_point(record)
    return results


def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (torchrun,
    ``accelerate launch``); ``(0, 1, 0)`` when not launched so."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(f"bad RANK/WORLD_SIZE/LOCAL_RANK environment: {err}") from None
    return rank, world, local


def run_sweep(
    base_model: str,
    task_adapter: str,
    source_reference: str,
    target_reference: str | Sequence[str] | Mapping[str, str],
    output_dir: str | os.PathLike[str],
    *,
    tasks: Sequence[str],
    t_values: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    methods: Sequence[str] = ("adamergex",),
    include_path: str | Sequence[str] | None = None,
    include_defaults: bool | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    metric: str | None = None,
    config_kwargs: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    device: str | None = None,
    seed: int = 1234,
    progress: bool = True,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    label_free: bool = True,
    reference_task: str | None = None,
    select: str = "labelled",
    label_free_rule: str = DEFAULT_LABEL_FREE_RULE,
    rank: int | None = None,
    world_size: int | None = None,
    poll_interval: float = 2.0,
) -> SweepResults:
    """Sweep ``t`` (and methods) for one or several target languages; returns the results (also on disk).

    Args:
        base_model: the base model's name or path (its tokenizer is used).
        task_adapter, source_reference: PEFT adapter folders (all LoRA or all (IA)^3).
        target_reference: one folder (one target language), or ``{lang: folder}`` / a list of
            ``"lang=folder"`` (one cell per language, method and t; ``{lang}`` in ``tasks``).
        output_dir: where the outputs go (module docstring). If it already holds results of the
            same sweep settings, only the missing cells are evaluated; if the settings differ, a
            ``ValueError`` asks for another folder.
        tasks: lm-eval task (or group) names; ``{lang}`` is replaced by each language's code.
        t_values: values of ``t`` for the methods that use it.
        methods: registered merge methods (:data:`adamergex_peft.methods.METHODS`), e.g. ``adamergex``.
        include_path, include_defaults: where lm-eval finds the tasks (see :func:`make_evaluator`).
        limit, num_fewshot, batch_size, metric, seed: passed to lm-eval / used for scoring.
        config_kwargs: other :class:`~adamergex_peft.AdaMergeXConfig` fields (``lora_strategy``, ...).
        dtype, device: how the base model is loaded (several ranks: ``cuda:LOCAL_RANK`` by default
            when CUDA is there; ``device="cuda"`` also means each rank's own GPU).
        progress: show a progress bar over cells.
        on_point: called with each new point's record (the CLI prints them).
        label_free: store the label-free statistics and calibrated metrics of multiple-choice tasks.
        reference_task: a source-language lm-eval task: the reference distribution is the task
            adapter's predicted shares on it (evaluated once); ``None``: uniform.
        select: ``"labelled"`` or ``"label-free"``: which pick the JSON's ``selected`` holds.
        label_free_rule: a key of :data:`LABEL_FREE_RULES` (default ``calibrated_confidence``).
        rank, world_size: this process's share of the cells (default: ``RANK``/``WORLD_SIZE``).
        poll_interval: seconds between looks at the other ranks' shard files (rank 0 gathering).

    Returns:
        The gathered results on rank 0 (and in one process); on other ranks, the rank's own cells.
    """
    output_dir = Path(output_dir)
    if select not in SELECT_CHOICES:
        raise ValueError(f"select must be one of {list(SELECT_CHOICES)}, got {select!r}")
    if label_free_rule not in LABEL_FREE_RULES:
        raise ValueError(f"label_free_rule must be one of {list(LABEL_FREE_RULES)}, got {label_free_rule!r}")
    if reference_task is not None and not label_free:
        raise ValueError("reference_task needs label_free=True")
    refs = parse_target_references(target_reference)
    langs = list(refs) if isinstance(refs, dict) else None
    lang_tasks = {lang: tasks_for_lang(tasks, lang) for lang in (langs or [None])}
    if langs and len(langs) > 1 and not any(LANG_PLACEHOLDER in t for t in tasks):
        logger.warning("no %s in the task names: every language is evaluated on the same tasks", LANG_PLACEHOLDER)
    points = plan_points(methods, t_values, langs)
    # Validate the merge settings before anything is loaded; every point is this config with its method and t.
    base_config = AdaMergeXConfig.for_default_adapters(**dict(config_kwargs or {}))
    settings = _sweep_settings(
        base_model,
        (task_adapter, source_reference, refs),
        tasks,
        limit,
        num_fewshot,
        metric,
        config_kwargs,
        seed,
        reference_task,
    )
    env_rank, env_world, local_rank = distributed_env()
    rank = env_rank if rank is None else rank
    world = env_world if world_size is None else world_size
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    main = _load_or_start_results(output_dir, settings)
    merged = _gather(output_dir, settings, main, points, select, label_free_rule)
    todo = [p for i, p in enumerate(points) if i % world == rank and p.key not in merged.done()]
    need_reference = reference_task is not None and merged.reference is None and rank == 0
    all_done = not any(p.key not in merged.done() for p in points)
    if all_done and world == 1:
        logger.info("all %d cells already done in %s", len(points), output_dir)
        merged.save(output_dir)
        return merged
    shard = None
    if not all_done and (todo or need_reference):
        if world > 1:
            device = _rank_device(device, local_rank)
        peft_model, tokenizer = load_sweep_model(
            base_model, task_adapter, source_reference, refs, dtype=dtype, device=device
        )
        target_adapters = {lang: target_adapter_name(lang) for lang in (langs or [None])}
        base_config = dataclasses.replace(base_config, target_reference_adapter=next(iter(target_adapters.values())))
        all_tasks = [t for names in lang_tasks.values() for t in names]
        common = {
            "include_path": include_path,
            "include_defaults": include_defaults,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "metric": metric,
            "seed": seed,
            "task_manager": _task_manager(include_path, include_defaults, all_tasks),
        }
        reference = merged.reference
        if reference_task is not None and reference is None:
            reference = _reference(
                output_dir,
                rank,
                world,
                poll_interval,
                lambda: _evaluate_reference(peft_model, tokenizer, base_config, reference_task, common),
            )
            merged.reference = reference
        distribution = None if reference is None else reference["distribution"]
        evaluators = {
            lang: make_evaluator(
                tokenizer,
                lang_tasks[lang],
                label_free=label_free,
                reference=distribution,
                reference_name="uniform" if reference is None else reference["task"],
                **common,
            )
            for lang in dict.fromkeys(p.lang for p in todo)
        }
        if world == 1:
            return evaluate_points(
                peft_model,
                todo,
                evaluators,
                merged,
                output_dir,
                base_config=base_config,
                progress=progress,
                on_point=on_point,
                target_adapters=target_adapters,
            )
        shard_path = output_dir / SHARDS_DIR / f"rank{rank}.json"
        shard = SweepResults.load(shard_path) if shard_path.is_file() else SweepResults(settings=settings)
        shard.reference = shard.reference or reference
        if shard.settings != settings:
            raise ValueError(f"{shard_path} holds a sweep with other settings: use another --output folder")
        evaluate_points(
            peft_model,
            todo,
            evaluators,
            shard,
            output_dir,
            base_config=base_config,
            progress=progress,
            on_point=on_point,
            target_adapters=target_adapters,
            save=lambda res: res.save_shard(shard_path),
        )
    _barrier()  # every rank exactly once (when a torch.distributed process group is initialised)
    if rank != 0:
        return shard if shard is not None else merged
    return _wait_and_gather(output_dir, settings, main, points, select, label_free_rule, poll_interval)


def _rank_device(device: str | None, local_rank: int) -> str | None:
    """Each rank's own accelerator: ``cuda:LOCAL_RANK`` for ``None`` (when CUDA is there) or ``"cuda"``."""
    import torch

    if device is None and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    if device == "cuda":
        return f"cuda:{local_rank}"
    return device


def _task_manager(include_path, include_defaults, tasks: Sequence[str]):
    """One lm-eval task index for every language's evaluator (as :func:`make_evaluator` would build)."""
    from lm_eval.tasks import TaskManager

    if include_defaults is None:
        if include_path:
            local = TaskManager(include_path=include_path, include_defaults=False)
            if all(t in local.all_tasks for t in tasks):
                return local
        include_defaults = True
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _evaluate_reference(peft_model, tokenizer, base_config, reference_task: str, common) -> dict[str, Any]:
    """The task adapter's (``task_only``) predicted shares on the reference task (no labels read)."""
    manager = common["task_manager"]
    if reference_task not in manager.all_tasks:
        manager = _task_manager(common["include_path"], common["include_defaults"], [reference_task])
    evaluate = make_evaluator(tokenizer, [reference_task], label_free=True, **{**common, "task_manager": manager})
    summary = _merged_evaluation(peft_model, dataclasses.replace(base_config, method="task_only", t=1.0), evaluate)
    pooled = pooled_distribution(summary["label_free"])
    logger.info("reference distribution (task adapter on %s): %s", reference_task, pooled["distribution"])
    return {"task": reference_task, **pooled}


def _reference(output_dir: Path, rank: int, world: int, poll_interval: float, compute) -> dict[str, Any]:
    """The reference distribution: computed on rank 0 (written to the shards folder), read by the others."""
    path = output_dir / SHARDS_DIR / REFERENCE_JSON
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    if rank == 0:
        reference = compute()
        if world > 1:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(reference) + "\n")
        return reference
    logger.info("rank %d: waiting for rank 0's reference distribution (%s)", rank, path)
    while not path.is_file():
        time.sleep(poll_interval)
    return json.loads(path.read_text(encoding="utf-8"))


def _barrier() -> None:
    """A ``torch.distributed`` barrier when a process group is initialised (else nothing)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _load_shards(output_dir: Path, settings: dict[str, Any]) -> list[SweepResults]:
    shards = []
    for path in sorted((output_dir / SHARDS_DIR).glob("rank*.json")):
        shard = SweepResults.load(path)
        if shard.settings != settings:
            raise ValueError(
                f"{path} holds a sweep with other settings: use another --output folder, or delete it to start over"
            )
        shards.append(shard)
    return shards


def _gather(output_dir, settings, main: SweepResults, points, select, rule) -> SweepResults:
    """``main``'s points, then the shard files' points not in it (in plan order): one record."""
    shards = _load_shards(output_dir, settings)
    merged = SweepResults(
        settings=settings, points=list(main.points), reference=main.reference, select=select, label_free_rule=rule
    )
    order = {p.key: i for i, p in enumerate(points)}
    extra: dict[str, dict[str, Any]] = {}
    for shard in shards:
        merged.reference = merged.reference or shard.reference
        for p in shard.points:
            if p["key"] not in merged.done():
                extra.setdefault(p["key"], p)
    merged.points += sorted(extra.values(), key=lambda p: order.get(p["key"], len(order)))
    reference_path = output_dir / SHARDS_DIR / REFERENCE_JSON
    if merged.reference is None and reference_path.is_file():
        merged.reference = json.loads(reference_path.read_text(encoding="utf-8"))
    return merged


def _wait_and_gather(output_dir, settings, main, points, select, rule, poll_interval) -> SweepResults:
    """Rank 0: wait until every planned cell is in some shard file, then write the gathered outputs."""
    last_log = 0.0
    while True:
        merged = _gather(output_dir, settings, main, points, select, rule)
        missing = [p.key for p in points if p.key not in merged.done()]
        if not missing:
            break
        if time.monotonic() - last_log > 60:
            logger.info("rank 0: waiting for %d cells of the other ranks (%s, ...)", len(missing), missing[0])
            last_log = time.monotonic()
        time.sleep(poll_interval)
    merged.save(output_dir)
    return merged


def _sweep_settings(
    base_model, adapter_dirs, tasks, limit, num_fewshot, metric, config_kwargs, seed, reference_task=None
) -> dict[str, Any]:
    """The settings that identify a sweep (a resumed sweep must have the same), as stored in JSON."""
    task_adapter, source_reference, target_reference = adapter_dirs
    settings = {
        "base_model": str(base_model),
        "task_adapter": str(task_adapter),
        "source_reference": str(source_reference),
        "target_reference": (
            {k: str(v) for k, v in target_reference.items()}
            if isinstance(target_reference, Mapping)
            else str(target_reference)
        ),
        "tasks": list(tasks),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "metric": metric,
        "config": dict(config_kwargs or {}),
        "seed": seed,
    }
    if reference_task is not None:  # only when set: folders of earlier sweeps still resume
        settings["reference_task"] = reference_task
    return json.loads(json.dumps(settings))  # normalise tuples to lists, as stored


def _load_or_start_results(output_dir: Path, settings: dict[str, Any]) -> SweepResults:
    """The results already in ``output_dir`` (same settings only), or an empty record."""
    results_path = output_dir / RESULTS_JSON
    if not results_path.is_file():
        return SweepResults(settings=settings)
    results = SweepResults.load(results_path)
    if results.settings != settings:
        changed = sorted(k for k in {*settings, *results.settings} if results.settings.get(k) != settings.get(k))
        raise ValueError(
            f"{results_path} holds a sweep with other settings ({', '.join(changed)}): "
            "use another --output folder, or delete it to start over"
        )
    return results
