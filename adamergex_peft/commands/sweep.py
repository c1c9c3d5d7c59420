"""``adamergex sweep``: merge at several values of t, evaluate each with lm-eval, name the best."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from adamergex_peft.commands.merge import accept_negative_numbers, finite_float, method_choices, methods_help
    from adamergex_peft.methods import IA3_STRATEGIES, LORA_STRATEGIES, METHODS

    parser = subparsers.add_parser(
        "sweep",
        help="Evaluate merges at several t (and methods) with lm-eval; write JSON, CSV, a plot; name the best t.",
        description=(
            "Load the base model once with the task, source-reference and target-reference adapters; for each "
            "(method, t) merge into the base weights in place, evaluate through lm-eval's Python API, and undo the "
            "merge. Results go to OUTPUT/sweep_results.{json,csv} and OUTPUT/sweep_plot.png after every point; "
            "running the same command again resumes from the points already done. Methods that do not use t "
            f"({', '.join(m for m, method in METHODS.items() if not method.uses_t)}) are evaluated once."
        ),
    )
    parser.add_argument("--base-model", required=True, help="Base model name or path.")
    parser.add_argument("--task-adapter", required=True, help="Task adapter folder (source language).")
    parser.add_argument("--source-reference", required=True, help="Reference adapter folder, source language.")
    parser.add_argument("--target-reference", required=True, help="Reference adapter folder, target language.")
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
    parser.add_argument("--tasks", nargs="+", required=True, help="lm-eval task or group names (target language).")
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
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    accept_negative_numbers(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adamergex_peft.sweep import PLOT_PNG, RESULTS_CSV, RESULTS_JSON, run_sweep

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

    def show(record: dict) -> None:
        t = "-" if record["t"] is None else f"{record['t']:g}"
        print(f"{record['method']:>18}  t={t:<6} score={record['score']:.4f}", flush=True)

    results = run_sweep(
        args.base_model,
        args.task_adapter,
        args.source_reference,
        args.target_reference,
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
    )
    best = results.best()
    if best is not None:
        t = "(t not used)" if best["t"] is None else f"t={best['t']:g}"
        print(f"best: {best['method']} {t} score={best['score']:.4f}")
    print(f"results: {args.output}/{RESULTS_JSON}, {args.output}/{RESULTS_CSV}, plot: {args.output}/{PLOT_PNG}")
    return 0
