"""``adamergex merge``: merge three adapter folders into one, without a base model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="Merge a task adapter and two reference adapters into a target-language task adapter.",
        description=(
            "Build the target-language task adapter T + t * (Rg - Rs) (LoRA; (IA)^3: T * (Rg / Rs)) from adapter "
            "folders. Writes a standard PEFT adapter folder plus adamergex_config.json; no base model is loaded."
        ),
    )
    parser.add_argument("--task", required=True, metavar="DIR", help="Task adapter, source language.")
    parser.add_argument(
        "--source-reference", required=True, metavar="DIR", help="Reference (causal LM) adapter, source language."
    )
    parser.add_argument(
        "--target-reference", required=True, metavar="DIR", help="Reference (causal LM) adapter, target language."
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="Folder to write the merged adapter to.")
    parser.add_argument("--t", type=float, default=1.0, help="Scale of the language gap (default: 1.0).")
    parser.add_argument(
        "--method",
        default="adamergex",
        choices=["adamergex", "cross", "arimerge", "task_only", "task_plus_target"],
        help="AdaMergeX or one of the paper's baselines (default: adamergex).",
    )
    parser.add_argument(
        "--lora-strategy",
        default="exact",
        choices=["exact", "svd", "factorwise"],
        help="LoRA representation: exact stacked factors, svd-compressed, or the official code's factorwise.",
    )
    parser.add_argument(
        "--ia3-strategy", default="linear", choices=["linear", "power"], help="(IA)^3 operator (default: linear)."
    )
    parser.add_argument("--svd-rank", type=int, default=None, help="Rank for --lora-strategy svd.")
    parser.add_argument(
        "--arimerge-weights",
        type=float,
        nargs=2,
        default=(0.5, 0.5),
        metavar=("C0", "C1"),
        help="Task and language weights for --method arimerge (default: 0.5 0.5).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adamergex_peft.config import AdaMergeXConfig
    from adamergex_peft.files import merge_adapter_files

    config = AdaMergeXConfig(
        task_adapter=args.task,
        source_reference_adapter=args.source_reference,
        target_reference_adapter=args.target_reference,
        t=args.t,
        method=args.method,
        lora_strategy=args.lora_strategy,
        ia3_strategy=args.ia3_strategy,
        svd_rank=args.svd_rank,
        arimerge_weights=tuple(args.arimerge_weights),
    )
    output = merge_adapter_files(
        args.task, args.source_reference, args.target_reference, args.output, config, overwrite=args.overwrite
    )
    print(f"wrote {output}")
    return 0
