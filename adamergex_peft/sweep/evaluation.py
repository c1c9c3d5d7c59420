"""Evaluating one merged model with lm-eval, and reducing lm-eval's output.

The scores (:func:`summarize_lm_eval`), the per-item choice log-likelihoods of the logged samples
(:func:`choice_logliks`), their label-free statistics and calibrated metrics
(:func:`summarize_samples`; see :mod:`adamergex_peft.sweep`), and :func:`make_evaluator`, which runs
lm-eval's Python API on an in-memory model. torch and lm-eval are imported where used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

PREFERRED_METRICS = ("acc", "exact_match", "rougeL", "f1", "bleu")


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
    """The label-free statistics of one task's choice log-likelihoods (:mod:`adamergex_peft.sweep`); reads no labels."""
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


def shared_task_manager(include_path, include_defaults, tasks: Sequence[str]):
    """One lm-eval task index for every language's evaluator (as :func:`make_evaluator` would build)."""
    from lm_eval.tasks import TaskManager

    if include_defaults is None:
        if include_path:
            local = TaskManager(include_path=include_path, include_defaults=False)
            if all(t in local.all_tasks for t in tasks):
                return local
        include_defaults = True
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


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

    tasks = list(tasks)
    if not tasks:
        raise ValueError("give at least one lm-eval task")
    if task_manager is None:
        task_manager = shared_task_manager(include_path, include_defaults, tasks)
    loaded = _load_tasks(task_manager, tasks, gen_kwargs=gen_kwargs, num_fewshot=num_fewshot, seed=seed)

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


def _load_tasks(task_manager, tasks: Sequence[str], *, gen_kwargs, num_fewshot: int | None, seed: int) -> dict:
    """Load the tasks (with their data) and apply the per-task settings ``lm_eval.simple_evaluate`` applies."""
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
    return loaded


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
