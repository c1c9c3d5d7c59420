"""``adamergex build-reference-data``: cut plain text into reference-task windows (JSONL)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build-reference-data",
        help="Cut plain text (files or a hub dataset) into reference-task windows (JSONL).",
        description=(
            "Concatenate the text of the inputs (newlines removed) and cut it into windows of "
            "--window-size units: all but the last --completion-size units form the prompt, the rest the "
            "completion. Units are words, or characters for zh/ja/th. Writes JSONL lines "
            '{"prompt": ..., "completion": ...} where prompt + completion is the window text. '
            "Streams with constant memory; the output is deterministic."
        ),
    )
    parser.add_argument("--lang", required=True, help="Language code (picks words or characters as unit).")
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="SOURCE",
        help="Text files, folders of .txt files, or a Hugging Face dataset id (streamed).",
    )
    parser.add_argument("--output", required=True, help="JSONL file to write.")
    parser.add_argument("--window-size", type=int, default=512, help="Units per window (default: 512).")
    parser.add_argument("--completion-size", type=int, default=1, help="Units in the completion (default: 1).")
    parser.add_argument("--stride", type=int, default=None, help="Units between window starts (default: window size).")
    parser.add_argument("--unit", choices=("word", "char"), default=None, help="Override the language's unit.")
    parser.add_argument("--max-windows", type=int, default=None, help="Stop after this many windows.")
    parser.add_argument("--dataset-config", default=None, help="Hub dataset config (e.g. 20231101.sw).")
    parser.add_argument("--split", default="train", help="Hub dataset split (default: train).")
    parser.add_argument("--text-field", default="text", help="Hub dataset text column (default: text).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adamergex_peft.data import build_reference_data

    count = build_reference_data(
        args.input,
        args.output,
        args.lang,
        window_size=args.window_size,
        completion_size=args.completion_size,
        stride=args.stride,
        unit=args.unit,
        max_windows=args.max_windows,
        dataset_config=args.dataset_config,
        split=args.split,
        text_field=args.text_field,
        progress=not args.no_progress,
    )
    print(f"wrote {count} windows to {args.output}")
    return 0
