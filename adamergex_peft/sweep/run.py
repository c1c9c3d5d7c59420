"""``run_sweep``: plan the grid, load the model once, evaluate this rank's cells, gather and write the outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adamergex_peft.config import AdaMergeXConfig
from adamergex_peft.sweep.distributed import (
    SHARDS_DIR,
    barrier,
    distributed_env,
    gather_results,
    rank_device,
    shared_reference,
    wait_and_gather,
)
from adamergex_peft.sweep.evaluation import make_evaluator, pooled_distribution, shared_task_manager
from adamergex_peft.sweep.loop import evaluate_points, load_sweep_model, merged_evaluation, target_adapter_name
from adamergex_peft.sweep.plan import (
    LANG_PLACEHOLDER,
    SweepPoint,
    parse_target_references,
    plan_points,
    tasks_for_lang,
)
from adamergex_peft.sweep.results import RESULTS_JSON, SweepResults
from adamergex_peft.sweep.selection import DEFAULT_LABEL_FREE_RULE, LABEL_FREE_RULES, SELECT_CHOICES

logger = logging.getLogger(__name__)


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
        output_dir: where the outputs go (:mod:`adamergex_peft.sweep`). If it already holds results of the
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
    _check_selection(select, label_free_rule, reference_task, label_free)
    refs = parse_target_references(target_reference)
    langs = list(refs) if isinstance(refs, dict) else None
    lang_tasks = _lang_tasks(tasks, langs)
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
    rank, world, local_rank = _rank_and_world(rank, world_size)
    main = _load_or_start_results(output_dir, settings)
    merged = gather_results(output_dir, settings, main, points, select, label_free_rule)
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
            device = rank_device(device, local_rank)
        peft_model, tokenizer = load_sweep_model(
            base_model, task_adapter, source_reference, refs, dtype=dtype, device=device
        )
        target_adapters = {lang: target_adapter_name(lang) for lang in (langs or [None])}
        base_config = dataclasses.replace(base_config, target_reference_adapter=next(iter(target_adapters.values())))
        common = _evaluator_settings(
            lang_tasks,
            include_path=include_path,
            include_defaults=include_defaults,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            metric=metric,
            seed=seed,
        )
        if reference_task is not None and merged.reference is None:
            merged.reference = shared_reference(
                output_dir,
                rank,
                world,
                poll_interval,
                lambda: _evaluate_reference(peft_model, tokenizer, base_config, reference_task, common),
            )
        reference = merged.reference
        evaluators = _evaluators(tokenizer, lang_tasks, todo, label_free, reference, common)
        loop = {
            "base_config": base_config,
            "progress": progress,
            "on_point": on_point,
            "target_adapters": target_adapters,
        }
        if world == 1:
            return evaluate_points(peft_model, todo, evaluators, merged, output_dir, **loop)
        shard, shard_path = _open_shard(output_dir, rank, settings, reference)
        evaluate_points(
            peft_model, todo, evaluators, shard, output_dir, save=lambda res: res.save_shard(shard_path), **loop
        )
    barrier()  # every rank exactly once (when a torch.distributed process group is initialised)
    if rank != 0:
        return shard if shard is not None else merged
    return wait_and_gather(output_dir, settings, main, points, select, label_free_rule, poll_interval)


def _check_selection(select: str, label_free_rule: str, reference_task: str | None, label_free: bool) -> None:
    """Refuse an unknown ``select`` or label-free rule, and a reference task without label-free statistics."""
    if select not in SELECT_CHOICES:
        raise ValueError(f"select must be one of {list(SELECT_CHOICES)}, got {select!r}")
    if label_free_rule not in LABEL_FREE_RULES:
        raise ValueError(f"label_free_rule must be one of {list(LABEL_FREE_RULES)}, got {label_free_rule!r}")
    if reference_task is not None and not label_free:
        raise ValueError("reference_task needs label_free=True")


def _lang_tasks(tasks: Sequence[str], langs: list[str] | None) -> dict[str | None, list[str]]:
    """Each language's task names (warning when several languages would all run the same tasks)."""
    lang_tasks = {lang: tasks_for_lang(tasks, lang) for lang in (langs or [None])}
    if langs and len(langs) > 1 and not any(LANG_PLACEHOLDER in t for t in tasks):
        logger.warning("no %s in the task names: every language is evaluated on the same tasks", LANG_PLACEHOLDER)
    return lang_tasks


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int, int]:
    """``(rank, world, local_rank)``: the arguments where given, else the launcher's environment."""
    env_rank, env_world, local_rank = distributed_env()
    rank = env_rank if rank is None else rank
    world = env_world if world_size is None else world_size
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    return rank, world, local_rank


def _evaluator_settings(lang_tasks: Mapping[str | None, Sequence[str]], **settings: Any) -> dict[str, Any]:
    """The :func:`make_evaluator` arguments every language shares, with one lm-eval task index for all their tasks."""
    all_tasks = [t for names in lang_tasks.values() for t in names]
    task_manager = shared_task_manager(settings["include_path"], settings["include_defaults"], all_tasks)
    return {**settings, "task_manager": task_manager}


def _evaluators(tokenizer, lang_tasks, todo: Sequence[SweepPoint], label_free: bool, reference, common):
    """One evaluator per language that has cells to do, all against the same reference distribution."""
    distribution = None if reference is None else reference["distribution"]
    return {
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


def _open_shard(output_dir: Path, rank: int, settings: dict[str, Any], reference) -> tuple[SweepResults, Path]:
    """This rank's shard record (resumed from its file when there, same settings only) and the file's path."""
    shard_path = output_dir / SHARDS_DIR / f"rank{rank}.json"
    shard = SweepResults.load(shard_path) if shard_path.is_file() else SweepResults(settings=settings)
    shard.reference = shard.reference or reference
    if shard.settings != settings:
        raise ValueError(f"{shard_path} holds a sweep with other settings: use another --output folder")
    return shard, shard_path


def _evaluate_reference(peft_model, tokenizer, base_config, reference_task: str, common) -> dict[str, Any]:
    """The task adapter's (``task_only``) predicted shares on the reference task (no labels read)."""
    manager = common["task_manager"]
    if reference_task not in manager.all_tasks:
        manager = shared_task_manager(common["include_path"], common["include_defaults"], [reference_task])
    evaluate = make_evaluator(tokenizer, [reference_task], label_free=True, **{**common, "task_manager": manager})
    summary = merged_evaluation(peft_model, dataclasses.replace(base_config, method="task_only", t=1.0), evaluate)
    pooled = pooled_distribution(summary["label_free"])
    logger.info("reference distribution (task adapter on %s): %s", reference_task, pooled["distribution"])
    return {"task": reference_task, **pooled}


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
