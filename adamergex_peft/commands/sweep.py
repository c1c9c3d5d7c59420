"""``adamergex sweep``: merge at several values of t, evaluate each with lm-eval, name the best."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from adamergex_peft.commands.merge import accept_negative_numbers, finite_float, method_choices, methods_help
    from adamergex_peft.methods import IA3_STRATEGIES, LORA_STRATEGIES, METHODS
    from adamergex_peft.sweep import DEFAULT_LABEL_FREE_RULE, LABEL_FREE_RULES, SELECT_CHOICES

    parser = subparsers.add_parser(
        "sweep",
        help="Evaluate merges at several t (and methods) with lm-eval; write JSON, CSV, a plot; name the best t.",
        description=(
            "Load the base model once with the task, source-reference and target-reference adapters; for each "
            "(method, t) merge into the base weights in place, evaluate through lm-eval's Python API, and undo the "
            "merge. Results go to OUTPUT/sweep_results.{json,csv}, OUTPUT/sweep_table.{csv,md}, OUTPUT/sweep_plot.png "
            "and OUTPUT/sweep_heatmap.png after every cell (language, method, t); "
            "running the same command again resumes from the points already done. Methods that do not use t "
            f"({', '.join(m for m, method in METHODS.items() if not method.uses_t)}) are evaluated once per language. "
            "Under torchrun or accelerate launch the cells are split over the processes (RANK/WORLD_SIZE); "
            "rank 0 gathers."
        ),
    )
    parser.add_argument("--base-model", required=True, help="Base model name or path.")
    parser.add_argument("--task-adapter", required=True, help="Task adapter folder (source language).")
    parser.add_argument("--source-reference", required=True, help="Reference adapter folder, source language.")
    parser.add_argument(
        "--target-reference",
        required=True,
        nargs="+",
        metavar="[LANG=]PATH",
        help="Reference adapter folder, target language; or several LANG=PATH (one model load, a languages x "
        "(method, t) grid; {lang} in --tasks is replaced by each LANG).",
    )
    parser.add_argument(
        "--t", type=finite_float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="Values of t (any finite)."
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["adamergex"],
        choices=method_choices(),
        help=f"Methods to evaluate (default: adamergex): {methods_help()}.",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        help="lm-eval task or group names (target language); {lang} stands for each language's code.",
    )
    parser.add_argument("--include-path", default=None, help="Folder of extra lm-eval task YAML.")
    parser.add_argument(
        "--include-defaults",
        choices=("auto", "yes", "no"),
        default="auto",
        help="Index lm-eval's built-in tasks (auto: only if a task is not under --include-path).",
    )
    parser.add_argument("--limit", type=float, default=None, help="Examples per task (int) or share (<1).")
    parser.add_argument("--num-fewshot", type=int, default=None, help="Few-shot examples.")
    parser.add_argument("--batch-size", default="8", help="lm-eval batch size (default: 8).")
    parser.add_argument(
        "--metric", default=None, help="Metric to score with (default: acc, exact_match, rougeL, ...)."
    )
    parser.add_argument("--lora-strategy", choices=list(LORA_STRATEGIES), default=None)
    parser.add_argument("--ia3-strategy", choices=list(IA3_STRATEGIES), default=None)
    parser.add_argument("--svd-rank", type=int, default=None)
    parser.add_argument("--arimerge-weights", type=float, nargs=2, default=None, metavar=("C0", "C1"))
    parser.add_argument(
        "--allow-different-base-models",
        action="store_true",
        help="Merge adapters whose base_model_name_or_path differ (warns) instead of refusing them.",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default=None, help="Device for the model (default: CPU).")
    parser.add_argument("--seed", type=int, default=1234, help="lm-eval seeds.")
    parser.add_argument("--output", required=True, help="Output folder (resumed if it holds this sweep).")
    parser.add_argument(
        "--reference-task",
        default=None,
        help="Source-language lm-eval task: the label-free statistics compare the predicted answer shares with the "
        "task adapter's shares on it (default: uniform).",
    )
    parser.add_argument(
        "--select",
        choices=SELECT_CHOICES,
        default="labelled",
        help="Which best point the JSON's 'selected' holds: 'labelled' (highest score) or 'label-free' (picked by "
        "--label-free-rule from statistics that read no target labels). Both are always printed.",
    )
    parser.add_argument(
        "--label-free-rule",
        choices=list(LABEL_FREE_RULES),
        default=DEFAULT_LABEL_FREE_RULE,
        help="Label-free rule: "
        + "; ".join(f"{name}: {rule.description}" for name, rule in LABEL_FREE_RULES.items())
        + f" (default: {DEFAULT_LABEL_FREE_RULE}).",
    )
    parser.add_argument(
        "--no-label-free",
        action="store_true",
        help="Skip the label-free statistics and calibrated metrics (lm-eval then logs no samples).",
    )
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    accept_negative_numbers(parser)
    parser.set_defaults(func=run)


def _describe(point: dict | None, value_key: str) -> str:
    if point is None:
        return "(none)"
    t = "(t not used)" if point["t"] is None else f"t={point['t']:g}"
    value = point.get(value_key)
    if value_key != "score" and point.get("label_free") is not None:
        value = point["label_free"].get(value_key)
    shown = f"{value:.4f}" if isinstance(value, float) else str(value)
    extra = f" score={point['score']:.4f}" if value_key != "score" and isinstance(point.get("score"), float) else ""
    return f"{point['method']} {t} {value_key}={shown}{extra}"


def run(args: argparse.Namespace) -> int:
    from adamergex_peft.sweep import (
        HEATMAP_PNG,
        LABEL_FREE_RULES,
        PLOT_PNG,
        RESULTS_CSV,
        RESULTS_JSON,
        TABLE_CSV,
        TABLE_MD,
        distributed_env,
        parse_target_references,
        run_sweep,
    )

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    batch_size = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)
    config_kwargs = {
        key: value
        for key, value in (
            ("lora_strategy", args.lora_strategy),
            ("ia3_strategy", args.ia3_strategy),
            ("svd_rank", args.svd_rank),
            ("arimerge_weights", args.arimerge_weights),
            ("allow_different_base_models", args.allow_different_base_models or None),
        )
        if value is not None
    }
    include_defaults = {"auto": None, "yes": True, "no": False}[args.include_defaults]
    rank, world, _local = distributed_env()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    targets = parse_target_references(args.target_reference)

    def show(record: dict) -> None:
        t = "-" if record["t"] is None else f"{record['t']:g}"
        lang = f"{record['lang']:>6} " if record.get("lang") else ""
        line = f"{prefix}{lang}{record['method']:>18}  t={t:<6} score={record['score']:.4f}"
        if isinstance(record.get("calibrated_score"), float):
            line += f" calibrated={record['calibrated_score']:.4f}"
        print(line, flush=True)

    results = run_sweep(
        args.base_model,
        args.task_adapter,
        args.source_reference,
        targets,
        args.output,
        tasks=args.tasks,
        t_values=args.t,
        methods=args.methods,
        include_path=args.include_path,
        include_defaults=include_defaults,
        limit=limit,
        num_fewshot=args.num_fewshot,
        batch_size=batch_size,
        metric=args.metric,
        config_kwargs=config_kwargs,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        on_point=show,
        label_free=not args.no_label_free,
        reference_task=args.reference_task,
        select=args.select,
        label_free_rule=args.label_free_rule,
    )
    if rank != 0:
        print(f"{prefix}done; rank 0 writes the gathered results to {args.output}")
        return 0
    statistic = LABEL_FREE_RULES[args.label_free_rule].statistic
    langs = [lang for lang in results.langs() if lang is not None]
    for lang in langs if len(langs) > 1 else []:
        print(f"best [{lang}]: {_describe(results.best(lang), 'score')}")
        print(
            f"best label-free [{lang}] ({args.label_free_rule}): {_describe(results.best_label_free(lang), statistic)}"
        )
    scope = " (mean over languages)" if len(langs) > 1 else ""
    best, picked = results.best(), results.best_label_free()
    if len(langs) > 1:
        best_text = "(none)" if best is None else f"{best['key']} score={best['score']:.4f}"
        picked_text = "(none)" if picked is None else f"{picked['key']} {statistic}={picked[statistic]:.4f}"
    else:
        best_text, picked_text = _describe(best, "score"), _describe(picked, statistic)
    marks = {"labelled": " (selected)" if args.select == "labelled" else "", "label-free": ""}
    marks["label-free"] = " (selected)" if args.select == "label-free" else ""
    print(f"best{scope}: {best_text}{marks['labelled']}")
    print(f"best label-free{scope} ({args.label_free_rule}): {picked_text}{marks['label-free']}")
    out = args.output
    print(
        f"results: {out}/{RESULTS_JSON}, {out}/{RESULTS_CSV}, table: {out}/{TABLE_CSV}, {out}/{TABLE_MD}, "
        f"plots: {out}/{PLOT_PNG}, {out}/{HEATMAP_PNG}"
    )
    return 0
