"""``adamergex train``: train one LoRA/(IA)^3 adapter (task or reference) with transformers' Trainer."""

from __future__ import annotations

import argparse
import json

# Flags that map one-to-one to TrainConfig fields: (flag, field, type, help).
_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--epochs", "num_train_epochs", float, "Training epochs."),
    ("--max-steps", "max_steps", int, "Optimiser steps (overrides --epochs)."),
    ("--lr", "learning_rate", float, "Peak learning rate."),
    ("--batch-size", "per_device_train_batch_size", int, "Batch size per device."),
    ("--grad-accum", "gradient_accumulation_steps", int, "Gradient accumulation steps."),
    ("--max-length", "max_length", int, "Maximum tokens per example."),
    ("--lora-r", "lora_r", int, "LoRA rank."),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha."),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout."),
    ("--seed", "seed", int, "Random seed."),
    ("--save-steps", "save_steps", int, "Checkpoint every N steps."),
    ("--logging-steps", "logging_steps", int, "Log the loss every N steps."),
    ("--max-examples", "max_examples", int, "Use only the first N examples."),
)


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="Train a task or reference adapter (LoRA or (IA)^3) with transformers' Trainer.",
        description=(
            'Train one adapter on JSONL data of {"prompt", "completion"} rows. --kind reference: causal '
            "LM on text windows (from build-reference-data), loss on every token. --kind task: loss on the "
            "completion only (change with --loss-on). Settings: defaults < --recipe < flags < --set. "
            "The output folder is a standard PEFT adapter folder."
        ),
    )
    parser.add_argument("--base-model", help="Base model name or path (required).")
    parser.add_argument("--data", help="Training data (JSONL; required).")
    parser.add_argument(
        "--kind", choices=("reference", "task"), default="task", help="What the data are (default: task)."
    )
    parser.add_argument(
        "--adapter", choices=("lora", "ia3"), default=None, help="Adapter type (default: the recipe's, else lora)."
    )
    parser.add_argument("--output", help="Folder for the adapter (required; checkpoints in OUTPUT/checkpoints).")
    parser.add_argument("--recipe", default=None, help="Shipped recipe name or a JSON file (see --list-recipes).")
    parser.add_argument("--list-recipes", action="store_true", help="Print the shipped recipes and exit.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer name or path (default: the base model's).")
    parser.add_argument("--loss-on", choices=("auto", "all", "completion"), default=None, help="Tokens with a loss.")
    parser.add_argument("--target-modules", nargs="+", default=None, help="Modules to adapt (LoRA or (IA)^3 targets).")
    parser.add_argument("--feedforward-modules", nargs="+", default=None, help="(IA)^3 feed-forward modules.")
    for flag, _field, type_, help_ in _FLAGS:
        parser.add_argument(flag, type=type_, default=None, help=help_)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="Any TrainConfig field (JSON value)."
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="CHECKPOINT",
        help="Resume from the last (or the given) checkpoint.",
    )
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adamergex_peft.train import list_recipes, resolve_config, train_adapter

    if args.list_recipes:
        for name, description in list_recipes().items():
            print(f"{name}: {description}")
        return 0
    missing = [flag for flag in ("base_model", "data", "output") if not getattr(args, flag)]
    if missing:
        raise ValueError("missing " + ", ".join("--" + m.replace("_", "-") for m in missing))

    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _t, _h in _FLAGS}
    overrides["loss_on"] = args.loss_on
    adapter_type = args.adapter
    config = resolve_config(args.recipe, None, adapter_type)
    if args.target_modules is not None:
        overrides["lora_target_modules" if config.adapter == "lora" else "ia3_target_modules"] = args.target_modules
    if args.feedforward_modules is not None:
        overrides["ia3_feedforward_modules"] = args.feedforward_modules
    overrides.update(_parse_set(args.set))
    config = config.updated(overrides)
    resume = True if args.resume == "last" else args.resume
    result = train_adapter(
        args.base_model,
        args.data,
        args.output,
        kind=args.kind,
        config=config,
        tokenizer=args.tokenizer,
        resume_from_checkpoint=resume,
        progress=not args.no_progress,
    )
    loss = "n/a" if result.train_loss is None else f"{result.train_loss:.4f}"
    print(
        f"saved {result.config.adapter} {result.kind} adapter to {result.output_dir} "
        f"({result.num_examples} examples, {result.global_step} steps, mean training loss {loss})"
    )
    return 0
