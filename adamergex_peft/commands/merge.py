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


def pad_rank_value(text: str) -> int | str:
    """``type=`` for --pad-rank: a positive int or ``vllm``."""
    if text.strip().lower() == "vllm":
        return "vllm"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'vllm', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'vllm', got {text!r}")
    return value


#: Merge settings (dest -> AdaMergeXConfig field); with --from-config they come from the record.
_SETTINGS = {
    "t": "t",
    "method": "method",
    "lora_strategy": "lora_strategy",
    "ia3_strategy": "ia3_strategy",
    "svd_rank": "svd_rank",
    "pad_rank": "pad_rank",
    "arimerge_weights": "arimerge_weights",
    "allow_different_base_models": "allow_different_base_models",
}
#: Output options recorded too (and so also refused with --from-config).
_OUTPUT_OPTIONS = ("base_model", "into_base", "dtype", "target_language", "source_language", "card_results")
_LANG_PATH = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)=(.+)$")


def register(subparsers: argparse._SubParsersAction) -> None:
    from adamergex_peft.methods import IA3_STRATEGIES, LORA_STRATEGIES, OPTION_DEFAULTS

    parser = subparsers.add_parser(
        "merge",
        help="Merge a task adapter and two reference adapters into a target-language task adapter.",
        description=(
            "Build the target-language task adapter T + t * (Rg - Rs) (LoRA; (IA)^3: T * (Rg / Rs)) from adapter "
            "folders. Writes a standard PEFT adapter folder (or, with --base-model and --into-base, a full "
            "transformers model) plus adamergex_config.json and a model card (README.md); no base model is loaded "
            "for an adapter. Upload the folder with `hf upload REPO_ID DIR`."
        ),
    )
    parser.add_argument("--task-adapter", metavar="DIR", help="Task adapter, source language (required).")
    # Deprecated spelling of --task-adapter, hidden from --help; still accepted so that old commands work.
    parser.add_argument("--task", dest="task_adapter", help=argparse.SUPPRESS)
    parser.add_argument(
        "--source-reference", metavar="DIR", help="Reference (causal LM) adapter, source language (required)."
    )
    parser.add_argument(
        "--target-reference",
        nargs="+",
        metavar="DIR|LANG=DIR",
        help="Reference (causal LM) adapter, target language (required). Several LANG=DIR (sw=DIR th=DIR ...): "
        "one merge per language into OUTPUT/LANG, the task and source reference read once; each language is "
        "published on its own and a failing one does not stop the others (exit 2 names it, the others are kept).",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="Folder to write the merged adapter (or model) to; with several LANG=DIR, one sub-folder per language.",
    )
    parser.add_argument(
        "--from-config",
        metavar="FILE",
        help="Re-run the merge recorded in an adamergex_config.json (all its settings and inputs; each input's "
        "sha256 must match the record). Only --output, --overwrite and --no-card may be given with it.",
    )
    parser.add_argument(
        "--t", type=finite_float, default=None, help="Scale of the language gap, any finite number (default: 1.0)."
    )
    parser.add_argument(
        "--method",
        default=None,
        choices=method_choices(),
        help=f"The merge method (default: adamergex): {methods_help()}.",
    )
    parser.add_argument(
        "--lora-strategy",
        default=None,
        choices=list(LORA_STRATEGIES),
        help="LoRA representation: exact stacked factors (default), svd-compressed, or the official code's factorwise.",
    )
    parser.add_argument(
        "--ia3-strategy", default=None, choices=list(IA3_STRATEGIES), help="(IA)^3 operator (default: linear)."
    )
    parser.add_argument(
        "--svd-rank",
        type=int,
        default=None,
        help="Rank for --lora-strategy svd (capped at the largest min(in, out) of the modules).",
    )
    parser.add_argument(
        "--pad-rank",
        type=pad_rank_value,
        default=None,
        metavar="N|vllm",
        help="LoRA: zero-pad the result to rank N (exact), one r and lora_alpha for all modules, so vLLM loads it "
        "(serve with --max-lora-rank >= N); 'vllm': the smallest rank vLLM accepts at or above the needed one. "
        "N below the needed rank is an error (truncate with --lora-strategy svd --svd-rank N).",
    )
    parser.add_argument(
        "--arimerge-weights",
        type=float,
        nargs=2,
        default=None,
        metavar=("C0", "C1"),
        help="Task and language weights for --method arimerge (default: {} {}).".format(
            *OPTION_DEFAULTS["arimerge_weights"]
        ),
    )
    parser.add_argument(
        "--allow-different-base-models",
        action="store_true",
        default=None,
        help="Merge adapters whose base_model_name_or_path differ (warns) instead of refusing them.",
    )
    parser.add_argument(
        "--base-model",
        metavar="NAME_OR_PATH",
        help="The base model: a local folder or a Hub id in the local cache (needed for --into-base); also the "
        "card's base_model.",
    )
    parser.add_argument(
        "--into-base",
        action="store_true",
        default=None,
        help="Write a full transformers model (the base with the update merged in, shard by shard) instead of an "
        "adapter; LoRA and (IA)^3. Needs --base-model.",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="With --into-base: dtype (default: the base's)."
    )
    parser.add_argument("--target-language", metavar="LANG", help="Target language code for the model card (e.g. sw).")
    parser.add_argument(
        "--source-language",
        metavar="LANG",
        help="Source language code of the task adapter for the model card (e.g. en).",
    )
    parser.add_argument(
        "--card-results", metavar="FILE", help="A sweep's sweep_results.json: adds its evaluation table to the card."
    )
    parser.add_argument("--no-card", action="store_true", help="Do not write a model card (README.md).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    accept_negative_numbers(parser)
    parser.set_defaults(func=run)


def parse_target_references(values: list[str]) -> str | dict[str, str]:
    """``[PATH]`` -> PATH (today's meaning); ``[LANG=PATH, ...]`` -> ``{LANG: PATH}``."""
    import os

    if len(values) == 1 and (os.path.isdir(values[0]) or not _LANG_PATH.match(values[0])):
        return values[0]
    targets: dict[str, str] = {}
    for value in values:
        match = _LANG_PATH.match(value)
        if match is None:
            raise ValueError(
                f"--target-reference {value!r}: with several target references each must be LANG=DIR (e.g. sw=refs/sw)."
            )
        lang, path = match.groups()
        if lang in targets:
            raise ValueError(f"--target-reference: language {lang!r} is given twice.")
        targets[lang] = path
    return targets


def run(args: argparse.Namespace) -> int:
    from adamergex_peft.config import AdaMergeXConfig
    from adamergex_peft.files import merge_adapter_files, merge_from_record

    if args.from_config is not None:
        given = [
            "--" + dest.replace("_", "-")
            for dest in ("task_adapter", "source_reference", "target_reference", *_SETTINGS, *_OUTPUT_OPTIONS)
            if getattr(args, dest) is not None
        ]
        if given:
            raise ValueError(f"--from-config re-runs the recorded merge; do not combine it with {', '.join(given)}.")
        output = merge_from_record(
            args.from_config, args.output, overwrite=args.overwrite, model_card=False if args.no_card else None
        )
        print(f"wrote {output}")
        return 0
    missing = [
        flag
        for flag, dest in (
            ("--task-adapter", "task_adapter"),
            ("--source-reference", "source_reference"),
            ("--target-reference", "target_reference"),
        )
        if getattr(args, dest) is None
    ]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)} (or --from-config FILE)")
    targets = parse_target_references(args.target_reference)
    settings = {field: getattr(args, dest) for dest, field in _SETTINGS.items() if getattr(args, dest) is not None}
    if "arimerge_weights" in settings:
        settings["arimerge_weights"] = tuple(settings["arimerge_weights"])
    first_target = targets if isinstance(targets, str) else next(iter(targets.values()))
    # The config names the folders (the single target, or the first language's); merge_adapter_files
    # takes them from it. Several languages are passed as the mapping.
    config = AdaMergeXConfig(
        task_adapter=args.task_adapter,
        source_reference_adapter=args.source_reference,
        target_reference_adapter=first_target,
        **settings,
    )
    output = merge_adapter_files(
        target_reference_dir=None if isinstance(targets, str) else targets,
        output_dir=args.output,
        config=config,
        overwrite=args.overwrite,
        base_model=args.base_model,
        into_base=bool(args.into_base),
        dtype=args.dtype,
        model_card=not args.no_card,
        source_language=args.source_language,
        target_language=args.target_language,
        card_results=args.card_results,
    )
    for path in output.values() if isinstance(output, dict) else [output]:
        print(f"wrote {path}")
    return 0
