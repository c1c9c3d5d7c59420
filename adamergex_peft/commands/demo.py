"""``adamergex demo``: the whole AdaMergeX pipeline on a small synthetic multilingual world, on CPU."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Run the whole pipeline (pretrain, train adapters, merge, evaluate) on a synthetic multilingual world.",
        description=(
            "Builds a source language and target languages derived from it (other vocabulary, word order and "
            "morphology), pretrains a tiny Llama on their text, trains LoRA and (IA)^3 adapters (task on "
            "source-language labels; causal-LM reference adapters per language; oracle task adapters on "
            "target-language labels), merges with AdaMergeX and the baselines, evaluates with lm-eval, and "
            "prints one table. Offline, CPU, a few minutes; seeded, so a second run prints the same table."
        ),
    )
    parser.add_argument(
        "--output", default="adamergex_demo_output", help="Output folder (default: ./adamergex_demo_output)."
    )
    parser.add_argument("--quick", action="store_true", help="A much smaller run (one target language; for tests).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the world and of training (default: 0).")
    parser.add_argument("--t", type=float, default=1.0, help="t of the merges (default: 1, the literal analogy).")
    parser.add_argument("--targets", type=int, default=None, help="Number of synthetic target languages (1-4).")
    parser.add_argument("--pretrain-sentences", type=int, default=None, help="Pretraining sentences per language.")
    parser.add_argument("--pretrain-epochs", type=float, default=None, help="Pretraining epochs.")
    parser.add_argument("--adapter-epochs", type=float, default=None, help="Epochs of every adapter.")
    parser.add_argument("--task-train", type=int, default=None, help="Labelled training examples per language.")
    parser.add_argument("--task-test", type=int, default=None, help="Test examples per language.")
    parser.add_argument("--families", nargs="+", choices=("lora", "ia3"), default=None, help="Adapter types.")
    parser.add_argument("--base-model", default=None, help="Use this causal LM instead of pretraining a tiny one.")
    parser.add_argument(
        "--text-dir",
        default=None,
        help="Your own data folder instead of the synthetic world: <lang>.txt, <lang>.train.jsonl, <lang>.test.jsonl.",
    )
    parser.add_argument("--source-lang", default=None, help="Source language code (with --text-dir).")
    parser.add_argument("--target-langs", nargs="+", default=None, help="Target language codes (with --text-dir).")
    parser.add_argument("--progress", action="store_true", help="Show training and evaluation progress bars.")
    # One thread unless --threads/OMP_NUM_THREADS say otherwise: the table is reproducible only at a fixed
    # thread count, and the tiny model gains little from more (see adamergex_peft.cli.choose_threads).
    parser.set_defaults(func=run, default_threads=1)


#: Warnings of the libraries the demo drives, which would bury its own lines: (category, module regex).
#: Only these are hidden, only while the demo runs, and only without -v/--progress; adamergex_peft's own
#: warnings and every other category still show.
NOISY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (DeprecationWarning, r"(lm_eval|transformers|peft|datasets|accelerate|torch)(\.|$)"),
    (FutureWarning, r"(lm_eval|transformers|peft|datasets|accelerate|torch)(\.|$)"),
    (UserWarning, r"(lm_eval|transformers|datasets|accelerate|torch)(\.|$)"),
)


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Keep the demo's output to its own lines: library logs, bars and known-noisy warnings off unless -v."""
    if verbose:
        yield
        return
    for name in ("lm_eval", "lm-eval", "transformers", "datasets", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    with warnings.catch_warnings():
        for category, module in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", category=category, module=module)
        yield


def run(args: argparse.Namespace) -> int:
    if args.base_model is None or os.path.isdir(args.base_model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not (args.progress or logging.getLogger().level <= logging.INFO):
        os.environ["TQDM_DISABLE"] = "1"  # lm-eval's and datasets' bars (read when tqdm is imported)
    start = time.perf_counter()
    from adamergex_peft.demo.pipeline import CHART_PNG, RESULTS_JSON, SIZES, run_demo, with_overrides
    from adamergex_peft.demo.report import format_table

    size = with_overrides(
        SIZES["quick" if args.quick else "full"],
        num_targets=args.targets,
        pretrain_sentences=args.pretrain_sentences,
        pretrain_epochs=args.pretrain_epochs,
        adapter_epochs=args.adapter_epochs,
        task_train=args.task_train,
        task_test=args.task_test,
        families=tuple(args.families) if args.families else None,
    )

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    with _quiet(verbose=args.progress or logging.getLogger().level <= logging.INFO):
        result = run_demo(
            args.output,
            size=size,
            seed=args.seed,
            t=args.t,
            base_model=args.base_model,
            text_dir=args.text_dir,
            source=args.source_lang,
            targets=args.target_langs,
            progress=args.progress,
            log=log,
        )
    print()
    print(format_table(result))
    print()
    print(f"results: {args.output}/{RESULTS_JSON}, chart: {args.output}/{CHART_PNG}")
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return 0
