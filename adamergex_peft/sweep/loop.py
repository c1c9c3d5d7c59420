"""The merge-evaluate-undo loop on one in-memory ``PeftModel`` holding every adapter of a sweep."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adamergex_peft.config import ADAPTER_FIELDS, DEFAULT_ADAPTER_NAMES, AdaMergeXConfig
from adamergex_peft.errors import AdaMergeXError
from adamergex_peft.sweep.plan import SweepPoint
from adamergex_peft.sweep.results import SweepResults

logger = logging.getLogger(__name__)

#: Names of the task, source-reference and target-reference adapters in the sweep's PeftModel.
ADAPTER_NAMES: tuple[str, str, str] = tuple(DEFAULT_ADAPTER_NAMES[f] for f in ADAPTER_FIELDS)


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


def merged_evaluation(peft_model, cfg: AdaMergeXConfig, evaluate: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
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
        summary = merged_evaluation(peft_model, cfg, evaluator)
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
