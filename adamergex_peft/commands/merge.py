"""``adamergex merge``: merge three adapter folders into one, without a base model."""

from __future__ import annotations

import argparse
import math
import re

# argparse takes "-1e-3", "-1e30" and "-inf" for options (it only knows "-1" and "-.5" as numbers).
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def accept_negative_numbers(parser: argparse.ArgumentParser) -> None:
    """Let ``parser`` read every negative float (``--t -1e-3``) as a value, not an option."""
    parser._negative_number_matcher = _NEGATIVE_NUMBER  # argparse's own hook (no option looks like a number)


def finite_float(text: str) -> float:
    """``type=`` for t: any finite float, negative included."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def method_choices() -> list[str]:
    from adamergex_peft.methods import METHODS

    return list(METHODS)


def methods_help() -> str:
    from adamergex_peft.methods import methods_help

    return methods_help()


def register(subparsers: argparse._SubParsersAction) -> None:
    from adamergex_peft.methods import IA3_STRATEGIES, LORA_STRATEGIES, OPTION_DEFAULTS

    parser = subparsers.add_parser(
        "merge",
        help="Merge a task adapter and two reference adapters into a target-language task adapter.",
        description=(
            "Build the target-language task adapter T + t * (Rg - Rs) (LoRA; (IA)^3: T * (Rg / Rs)) from adapter "
            "folders. Writes a standard PEFT adapter folder plus adamergex_config.json; no base model is loaded."
        ),
    )
    parser.add_argument("--task-adapter", metavar="DIR", help="Task adapter, source language (required).")
    # Deprecated spelling of --task-adapter, hidden from --help; still accepted so that old commands work.
    parser.add_argument("--task", dest="task_adapter", help=argparse.SUPPRESS)
    parser.add_argument(
        "--source-reference", required=True, metavar="DIR", help="Reference (causal LM) adapter, source language."
    )
    parser.add_argument(
        "--target-reference", required=True, metavar="DIR", help="Reference (causal LM) adapter, target language."
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="Folder to write the merged adapter to.")
    parser.add_argument(
        "--t", type=finite_float, default=1.0, help="Scale of the language gap, any finite number (default: 1.0)."
    )
    parser.add_argument(
        "--method",
        default="adamergex",
        choices=method_choices(),
        help=f"The merge method (default: adamergex): {methods_help()}.",
    )
    parser.add_argument(
        "--lora-strategy",
        default="exact",
        choices=list(LORA_STRATEGIES),
        help="LoRA representation: exact stacked factors, svd-compressed, or the official code's factorwise.",
    )
    parser.add_argument(
        "--ia3-strategy", default="linear", choices=list(IA3_STRATEGIES), help="(IA)^3 operator (default: linear)."
    )
    parser.add_argument(
        "--svd-rank",
        type=int,
        default=None,
        help="Rank for --lora-strategy svd (capped at the largest min(in, out) of the modules).",
    )
    parser.add_argument(
        "--arimerge-weights",
        type=float,
        nargs=2,
        default=OPTION_DEFAULTS["arimerge_weights"],
        metavar=("C0", "C1"),
        help="Task and language weights for --method arimerge (default: {} {}).".format(
            *OPTION_DEFAULTS["arimerge_weights"]
        ),
    )
    parser.add_argument(
        "--allow-different-base-models",
        action="store_true",
        help="Merge adapters whose base_model_name_or_path differ (warns) instead of refusing them.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    accept_negative_numbers(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adamergex_peft.config import AdaMergeXConfig
    from adamergex_peft.files import merge_adapter_files

    if args.task_adapter is None:
        raise ValueError("the following arguments are required: --task-adapter")
    config = AdaMergeXConfig(
        task_adapter=args.task_adapter,
        source_reference_adapter=args.source_reference,
        target_reference_adapter=args.target_reference,
        t=args.t,
        method=args.method,
        lora_strategy=args.lora_strategy,
        ia3_strategy=args.ia3_strategy,
        svd_rank=args.svd_rank,
        arimerge_weights=tuple(args.arimerge_weights),
        allow_different_base_models=args.allow_different_base_models,
    )
    # merge_adapter_files takes the folders separately; the config already names them.
    output = merge_adapter_files(*config.adapters.values(), args.output, config, overwrite=args.overwrite)
    print(f"wrote {output}")
    return 0
