"""Choose ``t``: merge at several values, evaluate each through lm-evaluation-harness, keep the best.

:func:`run_sweep` loads the base model once with the three adapters (task, source reference,
target reference) in one ``PeftModel``. For every (method, t) point it adds the merged update into
the base weights in place (:func:`adamergex_peft.merge_crosslingual_into_base`), evaluates the
base model with the adapters disabled through ``lm_eval.simple_evaluate`` (an ``HFLM`` wrapped
around the in-memory model), and takes the update out again (``handle.undo()``). Methods that do
not use ``t`` (``METHODS[m].uses_t`` false: ``task_only``, ``arimerge``) are evaluated once.

Outputs in ``output_dir`` (rewritten atomically after every point, so an interrupted sweep
resumes from the points already done):

* ``sweep_results.json``: the settings and, per point, the method, ``t``, the score and every
  task's metrics;
* ``sweep_results.csv``: one row per point;
* ``sweep_plot.png``: score against ``t``, one line per method (t-free methods as dashed lines).

The score of a point is the mean over the requested tasks of one metric per task: ``metric`` if
given, else the first of ``acc``, ``exact_match``, ``rougeL``, ``f1``, ``bleu`` that the task
reports, else its first numeric metric.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adamergex_peft.atomic import atomic_write_bytes, atomic_write_text
from adamergex_peft.config import ADAPTER_FIELDS, DEFAULT_ADAPTER_NAMES, AdaMergeXConfig
from adamergex_peft.methods import get_method

logger = logging.getLogger(__name__)

RESULTS_JSON = "sweep_results.json"
RESULTS_CSV = "sweep_results.csv"
PLOT_PNG = "sweep_plot.png"
PREFERRED_METRICS = ("acc", "exact_match", "rougeL", "f1", "bleu")
#: Names of the task, source-reference and target-reference adapters in the sweep's PeftModel.
ADAPTER_NAMES: tuple[str, str, str] = tuple(DEFAULT_ADAPTER_NAMES[f] for f in ADAPTER_FIELDS)


def __getattr__(name: str):
    if name == "T_FREE_METHODS":  # deprecated: read ``METHODS[m].uses_t``
        from adamergex_peft.methods import METHODS

        return frozenset(m for m, method in METHODS.items() if not method.uses_t)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class SweepPoint:
    """One merge to evaluate: a method and (for methods that use it) a value of ``t``."""

    method: str
    t: float | None

    @property
    def key(self) -> str:
        return self.method if self.t is None else f"{self.method}@{self.t:g}"


def plan_points(methods: Sequence[str], t_values: Sequence[float]) -> list[SweepPoint]:
    """The points of a sweep, in order; methods that do not use t (``METHODS[m].uses_t``) appear once, with ``t=None``."""
    if not methods:
        raise ValueError("give at least one method")
    uses_t = {m: get_method(m).uses_t for m in methods}
    if not t_values and any(uses_t.values()):
        raise ValueError("give at least one value of t")
    points: list[SweepPoint] = []
    for method in dict.fromkeys(methods):
        if not uses_t[method]:
            points.append(SweepPoint(method, None))
        else:
            points.extend(SweepPoint(method, float(t)) for t in dict.fromkeys(t_values))
    return points


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
    ``progress=False`` hides lm-eval's per-request progress bars.
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
    task_manager = None
    if include_defaults is None:
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

    def evaluate(model) -> dict[str, Any]:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval_evaluate(
            lm=lm,
            task_dict=loaded,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            verbosity=verbosity or "WARNING",
        )
        if results is None:  # pragma: no cover - only on non-zero ranks
            raise RuntimeError("lm-eval returned no results")
        return summarize_lm_eval(results, tasks, metric)

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


@dataclass
class SweepResults:
    """The settings and finished points of a sweep, stored in ``sweep_results.json``."""

    settings: dict[str, Any]
    points: list[dict[str, Any]] = field(default_factory=list)

    def done(self) -> set[str]:
        return {p["key"] for p in self.points}

    def best(self) -> dict[str, Any] | None:
        """The point with the highest score (the first one on ties), or ``None``."""
        scored = [p for p in self.points if p.get("score") is not None and not math.isnan(p["score"])]
        return max(scored, key=lambda p: p["score"]) if scored else None

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "points": self.points, "best": self.best()}

    @classmethod
    def load(cls, path: Path) -> SweepResults:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(settings=data["settings"], points=list(data["points"]))

    def save(self, output_dir: Path, plot: bool = True) -> None:
        """Write JSON and CSV (and the PNG plot) atomically."""
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / RESULTS_JSON, json.dumps(self.to_dict(), indent=2) + "\n")
        atomic_write_text(output_dir / RESULTS_CSV, self.to_csv())
        if plot and self.points:
            atomic_write_bytes(output_dir / PLOT_PNG, self.plot_png())

    def to_csv(self) -> str:
        task_names = sorted({t for p in self.points for t in p.get("chosen", {})})
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["method", "t", "score", *task_names])
        for p in self.points:
            row = [p["method"], "" if p["t"] is None else p["t"], p["score"]]
            row += [p.get("chosen", {}).get(t, {}).get("value", "") for t in task_names]
            writer.writerow(row)
        return buffer.getvalue()

    def plot_png(self) -> bytes:
        """Score against t, one line per method; t-free methods as horizontal dashed lines."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        ts = sorted({p["t"] for p in self.points if p["t"] is not None}) or [0.0, 1.0]
        for index, method in enumerate(dict.fromkeys(p["method"] for p in self.points)):
            pts = [p for p in self.points if p["method"] == method]
            if pts[0]["t"] is None:
                ax.hlines(pts[0]["score"], min(ts), max(ts), linestyles="dashed", label=method, colors=f"C{index}")
            else:
                pts = sorted(pts, key=lambda p: p["t"])
                ax.plot([p["t"] for p in pts], [p["score"] for p in pts], marker="o", label=method, color=f"C{index}")
        best = self.best()
        if best is not None and best["t"] is not None:
            ax.plot([best["t"]], [best["score"]], marker="*", markersize=14, color="gold", zorder=5, label="best")
        ax.set_xlabel("t")
        ax.set_ylabel(
            "score ("
            + ", ".join(sorted({c["metric"] for p in self.points for c in p.get("chosen", {}).values()}))
            + ")"
        )
        ax.set_title("AdaMergeX: score against t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()


def load_sweep_model(
    base_model: str,
    task_adapter: str,
    source_reference: str,
    target_reference: str,
    *,
    dtype: str = "float32",
    device: str | None = None,
):
    """Load the base model once with the three adapters named as in :data:`ADAPTER_NAMES`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import adamergex_peft  # noqa: F401  (attaches the PeftModel methods)

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=getattr(torch, dtype))
    if device is not None:
        base.to(device)
    model = PeftModel.from_pretrained(base, task_adapter, adapter_name=ADAPTER_NAMES[0])
    model.load_adapter(source_reference, adapter_name=ADAPTER_NAMES[1])
    model.load_adapter(target_reference, adapter_name=ADAPTER_NAMES[2])
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def evaluate_points(
    peft_model,
    points: Sequence[SweepPoint],
    evaluate: Callable[[Any], dict[str, Any]],
    results: SweepResults,
    output_dir: Path,
    *,
    adapters: tuple[str, str, str] = ADAPTER_NAMES,
    config_kwargs: Mapping[str, Any] | None = None,
    base_config: AdaMergeXConfig | None = None,
    progress: bool = True,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    plot: bool = True,
) -> SweepResults:
    """Evaluate the points not yet in ``results``, saving after each one (see :func:`run_sweep`).

    Each point's config is ``base_config`` with the point's ``method`` and ``t`` (``dataclasses.replace``);
    without ``base_config`` it is built from ``adapters`` (the task, source-reference and
    target-reference adapters inside ``peft_model``) and ``config_kwargs``. ``plot=False`` skips
    rewriting the PNG after every point.
    """
    from tqdm.auto import tqdm

    from adamergex_peft import merge_crosslingual_into_base

    if base_config is None:
        base_config = AdaMergeXConfig(*adapters, **dict(config_kwargs or {}))
    todo = [p for p in points if p.key not in results.done()]
    if len(todo) < len(points):
        logger.info("resuming: %d of %d points already done", len(points) - len(todo), len(points))
    base = peft_model.get_base_model()
    for point in tqdm(todo, desc="sweep", unit="point", disable=not progress):
        cfg = dataclasses.replace(base_config, method=point.method, t=1.0 if point.t is None else point.t)
        handle = merge_crosslingual_into_base(peft_model, cfg)
        try:
            with peft_model.disable_adapter():
                summary = evaluate(base)
        finally:
            handle.undo()
        record = {"key": point.key, "method": point.method, "t": point.t, **summary}
        results.points.append(record)
        results.save(output_dir, plot=plot)
        logger.info("%s: score %.4f", point.key, summary["score"])
        if on_point is not None:
            on_point(record)
    return results


def run_sweep(
    base_model: str,
    task_adapter: str,
    source_reference: str,
    target_reference: str,
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
) -> SweepResults:
    """Sweep ``t`` (and methods) for one language pair; returns the results (also written to disk).

    Args:
        base_model: the base model's name or path (its tokenizer is used).
        task_adapter, source_reference, target_reference: PEFT adapter folders (all LoRA or all (IA)^3).
        output_dir: where ``sweep_results.{json,csv}`` and ``sweep_plot.png`` go. If it already
            holds results of the same sweep settings, only the missing points are evaluated; if
            the settings differ, a ``ValueError`` asks for another folder.
        tasks: lm-eval task (or group) names.
        t_values: values of ``t`` for the methods that use it.
        methods: registered merge methods (:data:`adamergex_peft.methods.METHODS`), e.g. ``adamergex``.
        include_path, include_defaults: where lm-eval finds the tasks (see :func:`make_evaluator`).
        limit, num_fewshot, batch_size, metric, seed: passed to lm-eval / used for scoring.
        config_kwargs: other :class:`~adamergex_peft.AdaMergeXConfig` fields (``lora_strategy``, ...).
        dtype, device: how the base model is loaded.
        progress: show a progress bar over points.
        on_point: called with each new point's record (the CLI prints them).
    """
    output_dir = Path(output_dir)
    points = plan_points(methods, t_values)
    # Validate the merge settings before anything is loaded; every point is this config with its method and t.
    base_config = AdaMergeXConfig.for_default_adapters(**dict(config_kwargs or {}))
    settings = _sweep_settings(
        base_model,
        (task_adapter, source_reference, target_reference),
        tasks,
        limit,
        num_fewshot,
        metric,
        config_kwargs,
        seed,
    )
    results = _load_or_start_results(output_dir, settings)
    if all(p.key in results.done() for p in points):
        logger.info("all %d points already done in %s", len(points), output_dir)
        results.save(output_dir)
        return results
    peft_model, tokenizer = load_sweep_model(
        base_model, task_adapter, source_reference, target_reference, dtype=dtype, device=device
    )
    evaluate = make_evaluator(
        tokenizer,
        tasks,
        include_path=include_path,
        include_defaults=include_defaults,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        metric=metric,
        seed=seed,
    )
    return evaluate_points(
        peft_model,
        points,
        evaluate,
        results,
        output_dir,
        base_config=base_config,
        progress=progress,
        on_point=on_point,
    )


def _sweep_settings(
    base_model, adapter_dirs, tasks, limit, num_fewshot, metric, config_kwargs, seed
) -> dict[str, Any]:
    """The settings that identify a sweep (a resumed sweep must have the same), as stored in JSON."""
    task_adapter, source_reference, target_reference = adapter_dirs
    settings = {
        "base_model": str(base_model),
        "task_adapter": str(task_adapter),
        "source_reference": str(source_reference),
        "target_reference": str(target_reference),
        "tasks": list(tasks),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "metric": metric,
        "config": dict(config_kwargs or {}),
        "seed": seed,
    }
    return json.loads(json.dumps(settings))  # normalise tuples to lists, as stored


def _load_or_start_results(output_dir: Path, settings: dict[str, Any]) -> SweepResults:
    """The results already in ``output_dir`` (same settings only), or an empty record."""
    results_path = output_dir / RESULTS_JSON
    if not results_path.is_file():
        return SweepResults(settings=settings)
    results = SweepResults.load(results_path)
    if results.settings != settings:
        changed = sorted(k for k in settings if results.settings.get(k) != settings[k])
        raise ValueError(
            f"{results_path} holds a sweep with other settings ({', '.join(changed)}): "
            "use another --output folder, or delete it to start over"
        )
    return results
