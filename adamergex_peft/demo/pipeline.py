"""The demo pipeline: world -> tokenizer -> base LM -> reference data -> adapters -> merges -> lm-eval.

:func:`run_demo` runs AdaMergeX end to end with the project's own building blocks, the same ones a
user runs on Llama-2 (``build-reference-data``, ``train``, the merge API, the sweep's lm-eval
evaluation):

1. the world: a data folder with, per language ``L``, unlabelled text ``L.txt`` and task data
   ``L.train.jsonl`` / ``L.test.jsonl`` (``prompt``, ``completion``, ``choices``, ``label``). The
   synthetic world of :mod:`.world` is written in this layout; ``text_dir`` uses a folder of yours;
2. a tokenizer and a base model: a word-level tokenizer and a tiny Llama pretrained from scratch
   on the text of all languages, or ``base_model`` (a real model, not pretrained further);
3. reference data: each language's text cut into windows (:func:`adamergex_peft.data.build_reference_data`);
4. adapters, for LoRA and for (IA)^3, with :func:`adamergex_peft.train.train_adapter`: the task
   adapter on source-language labels, a reference adapter per language, and an oracle task adapter
   per target language trained on that language's labels (the upper bound);
5. evaluation through lm-eval (``simple_evaluate`` on task YAML generated for the test data) of
   every method merged into the base weights at ``t`` and undone again, exactly as
   ``adamergex sweep`` does;
6. one table (method x target language, and the share of the task_only-to-oracle gap each method
   closes), saved with the raw numbers as JSON and as a PNG chart.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from adamergex_peft.demo.lm import TinyLMSize
from adamergex_peft.demo.results import (  # noqa: F401  (re-exported: the demo's public names)
    CHART_PNG,
    MERGE_METHODS,
    RESULTS_JSON,
    TABLE_TXT,
    DemoResult,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSize:
    """Every size of the demo (the defaults take a few minutes on 2 CPU cores)."""

    num_targets: int = 2
    pretrain_sentences: int = 4000  # lines per language
    reference_sentences: int = 1500  # lines per language the reference windows are cut from
    window_size: int = 64  # words per reference window (the paper: 512)
    reference_windows: int = 120  # per language
    task_train: int = 300  # labelled examples per language (source: task adapter; targets: oracle)
    task_test: int = 200  # per language
    lm: TinyLMSize = field(
        default_factory=lambda: TinyLMSize(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256)
    )
    pretrain_epochs: float = 5.0
    pretrain_lr: float = 1e-2
    pretrain_block: int = 64
    pretrain_batch: int = 16
    adapter_epochs: float = 8.0  # task and oracle adapters
    reference_epochs: float = 2.0  # reference adapters
    lora_lr: float | None = 1e-2  # None: the cpu-small-lora recipe's
    ia3_lr: float | None = 1e-1  # None: the cpu-small-ia3 recipe's
    eval_batch_size: int = 64
    families: tuple[str, ...] = ("lora", "ia3")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = DemoSize(
    num_targets=1,
    pretrain_sentences=800,
    reference_sentences=400,
    window_size=32,
    reference_windows=30,
    task_train=96,
    task_test=48,
    lm=TinyLMSize(hidden_size=48, num_layers=2, num_heads=2, intermediate_size=128),
    pretrain_epochs=2.0,
    adapter_epochs=2.0,
    reference_epochs=1.0,
)
SIZES: dict[str, DemoSize] = {"full": DemoSize(), "quick": QUICK}


# ------------------------------------------------------------------------------------ the world


def write_synthetic_world(folder: Path, size: DemoSize, seed: int) -> tuple[str, list[str]]:
    """Write the synthetic world in the data-folder layout; return (source, targets) language codes."""
    from adamergex_peft.data import write_jsonl
    from adamergex_peft.demo.world import build_languages, task_examples, unlabelled_text

    folder.mkdir(parents=True, exist_ok=True)
    languages = build_languages(size.num_targets, seed)
    for index, language in enumerate(languages):
        text = unlabelled_text(language, size.pretrain_sentences + size.reference_sentences, seed=seed * 1000 + index)
        # One sentence per line; the reference windows are cut from the last part (see read_world_text).
        (folder / f"{language.code}.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
        # The same meanings in every language (same seeds): train and test sets are parallel.
        write_jsonl(
            task_examples(language, size.task_train, seed=seed * 1000 + 101), folder / f"{language.code}.train.jsonl"
        )
        write_jsonl(
            task_examples(language, size.task_test, seed=seed * 1000 + 202), folder / f"{language.code}.test.jsonl"
        )
    return languages[0].code, [lang.code for lang in languages[1:]]


def read_lines(path: Path, limit: int | None = None) -> list[str]:
    lines = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                lines.append(line.strip())
                if limit is not None and len(lines) >= limit:
                    break
    return lines


def check_world(folder: Path, source: str, targets: Sequence[str]) -> None:
    """Raise ``OSError`` naming the first missing file of the data-folder layout."""
    if not folder.is_dir():
        raise OSError(f"data folder {folder} does not exist")
    needed = [f"{source}.txt", f"{source}.train.jsonl", f"{source}.test.jsonl"]
    for lang in targets:
        needed += [f"{lang}.txt", f"{lang}.train.jsonl", f"{lang}.test.jsonl"]
    for name in needed:
        if not (folder / name).is_file():
            raise OSError(f"{folder / name} is missing (layout: <lang>.txt, <lang>.train.jsonl, <lang>.test.jsonl)")


def write_task_yaml(tasks_dir: Path, lang: str, test_file: Path) -> str:
    """Write an lm-eval multiple-choice task for ``test_file``; return its name.

    Besides ``acc`` it reports ``acc_calibrated``: accuracy after label-free calibration of the answer
    prior over the whole evaluated set (see :mod:`adamergex_peft.calibration`).
    """
    from adamergex_peft import testing

    name = f"adamergex_demo_{lang}"
    testing.write_task_yaml(
        tasks_dir,
        name,
        test_file,
        doc_to_text="prompt",
        doc_to_choice="choices",
        doc_to_target="label",
        target_delimiter=" ",
        process_results="!function utils.process_results",
        metrics=[
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {
                "metric": "acc_calibrated",
                "aggregation": "!function utils.calibrated_accuracy_of_items",
                "higher_is_better": True,
            },
        ],
        version=1.1,
    )
    (tasks_dir / "utils.py").write_text(_TASK_UTILS, encoding="utf-8")
    return name


_TASK_UTILS = """from adamergex_peft.calibration import calibrated_accuracy_of_items  # noqa: F401


def process_results(doc, results):
    lls = [ll for ll, _ in results]
    gold = int(doc["label"])
    acc = float(max(range(len(lls)), key=lls.__getitem__) == gold)  # = lm-eval's acc
    return {"acc": acc, "acc_calibrated": (gold, lls)}
"""


# ---------------------------------------------------------------------------------- the pipeline


@dataclass
class _Run:
    """What the steps of :func:`run_demo` share."""

    output: Path
    size: DemoSize
    seed: int
    progress: bool
    say: Callable[[str], None]
    world: Path = Path()
    source: str = ""
    targets: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    _clock: float = field(default_factory=time.perf_counter)

    @property
    def languages(self) -> list[str]:
        return [self.source, *self.targets]

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self._clock, 2)
        self._clock = now


def run_demo(
    output_dir: str | os.PathLike[str] = "adamergex_demo_output",
    *,
    size: DemoSize | str = "full",
    seed: int = 0,
    t: float = 1.0,
    base_model: str | None = None,
    text_dir: str | os.PathLike[str] | None = None,
    source: str | None = None,
    targets: Sequence[str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the whole pipeline and write ``demo_results.json``, ``demo_table.txt`` and ``demo_results.png``.

    Deterministic algorithms are on (seeded) for the run only: torch's previous settings are
    restored on return.

    Args:
        output_dir: folder for everything (world, base model, adapters, task YAML, results).
        size: a :class:`DemoSize` or ``"full"`` / ``"quick"``.
        seed: seed of the world, the initialisations and the data order.
        t: the merge's ``t`` for every method that uses it (1 = the literal analogy).
        base_model: a causal LM name/path to use instead of pretraining the tiny one.
        text_dir: a data folder of your own (``<lang>.txt``, ``<lang>.train.jsonl``,
            ``<lang>.test.jsonl``) instead of the synthetic world; needs ``source`` and ``targets``.
        progress: show Trainer/lm-eval progress bars.
        log: called with one line per stage (the CLI prints them).
    """
    import torch

    from adamergex_peft.demo.report import write_outputs
    from adamergex_peft.train import scoped_determinism

    size = SIZES[size] if isinstance(size, str) else size
    run = _Run(Path(output_dir), size, seed, progress, log or (lambda _msg: None))
    run.output.mkdir(parents=True, exist_ok=True)
    with scoped_determinism(seed):
        _prepare_world(run, text_dir, source, targets)
        model, tokenizer, pretrain_losses = _base_model(run, base_model)
        reference_files = _reference_data(run, synthetic=text_dir is None)
        jobs = _adapter_jobs(run, reference_files)
        training = {"pretrain_losses": pretrain_losses, **_train_adapters(run, model, tokenizer, jobs)}
        scores, calibrated, source_scores, errors = _evaluate(run, model, tokenizer, jobs, t)
    settings = {
        "seed": seed,
        "t": t,
        "size": size.to_dict(),
        "base_model": base_model or "tiny Llama pretrained from scratch",
        "text_dir": None if text_dir is None else str(text_dir),
        "torch_threads": torch.get_num_threads(),
    }
    result = DemoResult(
        settings=settings,
        source=run.source,
        targets=list(run.targets),
        scores=scores,
        calibrated_scores=calibrated,
        source_scores=source_scores,
        training=training,
        timings=run.timings,
        errors=errors,
    )
    run.timings["total"] = round(sum(run.timings.values()), 2)
    write_outputs(result, run.output)
    return result


def _prepare_world(run: _Run, text_dir, source: str | None, targets: Sequence[str] | None) -> None:
    """Step 1: the synthetic world written to ``output/world``, or the user's data folder, checked."""
    if text_dir is None:
        run.world = run.output / "world"
        run.source, run.targets = write_synthetic_world(run.world, run.size, run.seed)
        run.say(f"world: synthetic, source {run.source}, targets {', '.join(run.targets)} (written to {run.world})")
    else:
        run.world = Path(text_dir)
        if not source or not targets:
            raise ValueError("with --text-dir, give --source-lang and --target-langs")
        run.source, run.targets = source, list(targets)
        check_world(run.world, run.source, run.targets)
        run.say(f"world: {run.world}, source {run.source}, targets {', '.join(run.targets)}")
    run.lap("world")


def _base_model(run: _Run, base_model: str | None):
    """Step 2: a word-level tokenizer and a tiny Llama pretrained on all languages, or ``base_model``."""
    if base_model is not None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        run.say(f"base model: {base_model}")
        model.eval()
        run.lap("base_model")
        return model, tokenizer, []

    from adamergex_peft.data import read_jsonl
    from adamergex_peft.demo.lm import build_tiny_llama, pretrain_causal_lm
    from adamergex_peft.demo.tokenizer import build_word_tokenizer

    size, world, languages = run.size, run.world, run.languages
    texts = {lang: read_lines(world / f"{lang}.txt") for lang in languages}
    task_texts = [
        r["prompt"] + r["completion"] for lang in languages for r in read_jsonl(world / f"{lang}.train.jsonl")
    ]
    tokenizer = build_word_tokenizer([line for lines in texts.values() for line in lines] + task_texts)
    model = build_tiny_llama(tokenizer, size.lm, seed=run.seed)
    n_params = sum(p.numel() for p in model.parameters())
    pretrain_text = []
    for i in range(size.pretrain_sentences):  # interleave the languages
        pretrain_text += [texts[lang][i] for lang in languages if i < len(texts[lang])]
    run.say(f"base model: tiny Llama, {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}; pretraining...")
    losses = pretrain_causal_lm(
        model,
        tokenizer,
        pretrain_text,
        str(run.output / "pretrain_checkpoints"),
        max_length=size.pretrain_block,
        batch_size=size.pretrain_batch,
        epochs=size.pretrain_epochs,
        learning_rate=size.pretrain_lr,
        seed=run.seed,
        progress=run.progress,
    )
    model.save_pretrained(run.output / "base_model")
    tokenizer.save_pretrained(run.output / "base_model")
    run.say(f"  pretraining loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}")
    model.eval()
    run.lap("base_model")
    return model, tokenizer, losses


def _reference_data(run: _Run, synthetic: bool) -> dict[str, Path]:
    """Step 3: each language's text cut into windows (``build-reference-data``); the files by language."""
    from adamergex_peft.data import build_reference_data

    size, data_dir = run.size, run.output / "data"
    reference_files = {}
    for lang in run.languages:
        reference_files[lang] = data_dir / f"ref.{lang}.jsonl"
        if synthetic:  # windows from the part of the text not used for pretraining
            source_file = data_dir / f"text.{lang}.txt"
            data_dir.mkdir(parents=True, exist_ok=True)
            lines = read_lines(run.world / f"{lang}.txt")[size.pretrain_sentences :]
            source_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            source_file = run.world / f"{lang}.txt"
        n = build_reference_data(
            [source_file],
            reference_files[lang],
            lang,
            unit="word",
            window_size=size.window_size,
            max_windows=size.reference_windows,
            progress=run.progress,
        )
        if n == 0:
            raise ValueError(f"{source_file}: not enough text for one window of {size.window_size} words")
    run.say(f"reference data: {size.reference_windows} windows of {size.window_size} words per language")
    run.lap("reference_data")
    return reference_files


def _adapter_jobs(run: _Run, reference_files: dict[str, Path]) -> list[tuple[str, str, Path]]:
    """(adapter name, kind, data file): the task adapter first, then references, then oracles."""
    jobs = [("task", "task", run.world / f"{run.source}.train.jsonl")]
    jobs += [(f"ref_{lang}", "reference", reference_files[lang]) for lang in run.languages]
    jobs += [(f"oracle_{lang}", "task", run.world / f"{lang}.train.jsonl") for lang in run.targets]
    return jobs


def _train_adapters(run: _Run, model, tokenizer, jobs) -> dict[str, Any]:
    """Step 4: every adapter of every family, with the same code as ``adamergex train``."""
    from adamergex_peft.train import resolve_config, train_adapter

    size, training = run.size, {}
    for family in size.families:
        for name, kind, data in jobs:
            config = resolve_config(
                f"cpu-small-{family}",
                {
                    "num_train_epochs": size.reference_epochs if kind == "reference" else size.adapter_epochs,
                    "seed": run.seed,
                    "full_determinism": True,
                    "logging_steps": 1,
                    "learning_rate": size.lora_lr if family == "lora" else size.ia3_lr,
                    "max_length": max(size.pretrain_block, size.window_size + 8),
                },
            )
            result = train_adapter(
                model,
                data,
                run.output / "adapters" / family / name,
                kind=kind,
                config=config,
                tokenizer=tokenizer,
                progress=run.progress,
            )
            losses = result.losses
            training[f"{family}/{name}"] = {
                "examples": result.num_examples,
                "steps": result.global_step,
                "first_loss": losses[0][1] if losses else None,
                "last_loss": losses[-1][1] if losses else None,
            }
        languages, targets = ", ".join(run.languages), ", ".join(run.targets)
        run.say(f"adapters ({family}): task ({run.source}), reference ({languages}), oracle ({targets})")
    run.lap("adapters")
    return training


def _evaluate(run: _Run, model, tokenizer, jobs, t: float):
    """Step 5: lm-eval on every row, merging into the base weights and undoing, as ``adamergex sweep`` does.

    Returns ``(scores, calibrated_scores, source_scores, errors)`` (see :class:`DemoResult`).
    """
    from peft import PeftModel

    import adamergex_peft  # noqa: F401  (attaches PeftModel.merge_crosslingual*)
    from adamergex_peft.sweep import make_evaluator

    tasks_dir = run.output / "tasks"
    task_names = {lang: write_task_yaml(tasks_dir, lang, run.world / f"{lang}.test.jsonl") for lang in run.languages}
    evaluators = {
        lang: make_evaluator(
            tokenizer,
            [task_names[lang]],
            include_path=str(tasks_dir),
            include_defaults=False,
            batch_size=run.size.eval_batch_size,
            seed=run.seed,
            verbosity=None if run.progress else "ERROR",
            progress=run.progress,
            label_free=True,  # per-item log-likelihoods: the calibrated accuracy of each row
        )
        for lang in run.languages
    }
    scores, calibrated, source_scores, errors = {}, {}, {}, []
    for family in run.size.families:
        fam_dir = run.output / "adapters" / family
        peft_model = PeftModel.from_pretrained(model, fam_dir / "task", adapter_name="task")
        for name, _kind, _data in jobs[1:]:
            peft_model.load_adapter(fam_dir / name, adapter_name=name)
        peft_model.eval()
        scores[family], calibrated[family], source_scores[family] = _evaluate_family(
            run, peft_model, family, evaluators, t, errors
        )
        model = peft_model.unload()  # back to the plain base model for the next family
        run.say(f"evaluated ({family}): {len(scores[family])} rows x {len(run.targets)} target languages")
    run.lap("evaluation")
    return scores, calibrated, source_scores, errors


def _evaluate_family(
    run: _Run, peft_model, family: str, evaluators, t: float, errors: list
) -> tuple[dict, dict, float]:
    """The rows of one adapter family (base, every merge, oracle): accuracy and label-free calibrated
    accuracy per target language, and the task adapter's source-language accuracy."""
    from adamergex_peft import AdaMergeXError
    from adamergex_peft.methods import METHODS
    from adamergex_peft.sweep import SweepPoint, SweepResults, evaluate_points

    source = run.source

    def score(point: SweepPoint, evaluator, folder: Path, adapters: tuple[str, ...], results: SweepResults) -> tuple:
        """Merge into the base at ``point``, evaluate, undo; ``(accuracy, calibrated accuracy)``."""
        evaluate_points(
            peft_model, [point], evaluator, results, folder, adapters=adapters, progress=run.progress, plot=False
        )
        return results.points[-1]["score"], results.points[-1].get("calibrated_score")

    table: dict[str, dict[str, float | None]] = {}
    cal: dict[str, dict[str, float | None]] = {}
    with peft_model.disable_adapter():
        for lang in run.targets:
            summary = evaluators[lang](peft_model.get_base_model())
            table.setdefault("base (no adapter)", {})[lang] = summary["score"]
            cal.setdefault("base (no adapter)", {})[lang] = summary.get("calibrated_score")
    task_only = SweepPoint("task_only", None)
    for lang in run.targets:
        eval_dir = run.output / "eval" / f"{family}_{lang}"
        references = (f"ref_{source}", f"ref_{lang}")
        done = SweepResults(settings={"family": family, "lang": lang})  # every merge of this language, one file
        for method in MERGE_METHODS:
            point = SweepPoint(method, float(t) if METHODS[method].uses_t else None)
            try:
                value, cal_value = score(point, evaluators[lang], eval_dir, ("task", *references), done)
            except AdaMergeXError as err:  # e.g. an (IA)^3 reference vector at or below zero
                value = cal_value = None
                errors.append({"family": family, "method": method, "lang": lang, "error": str(err)})
                run.say(f"  {family} {method} {lang}: merge refused: {err}")
            table.setdefault(method, {})[lang] = value
            cal.setdefault(method, {})[lang] = cal_value
        oracle = SweepResults(settings={"family": family, "lang": lang, "adapter": f"oracle_{lang}"})
        adapters = (f"oracle_{lang}", *references)
        table.setdefault("oracle", {})[lang], cal.setdefault("oracle", {})[lang] = score(
            task_only, evaluators[lang], eval_dir / "oracle", adapters, oracle
        )
    source_score, _ = score(
        task_only,
        evaluators[source],
        run.output / "eval" / f"{family}_{source}",
        ("task", f"ref_{source}", f"ref_{run.targets[0]}"),  # task_only ignores the references
        SweepResults(settings={"family": family, "lang": source}),
    )
    order = ["base (no adapter)", *MERGE_METHODS, "oracle"]
    return {row: table[row] for row in order}, {row: cal[row] for row in order}, source_score


def with_overrides(size: DemoSize, **overrides: Any) -> DemoSize:
    """``size`` with the given fields replaced (``None`` values ignored)."""
    return replace(size, **{k: v for k, v in overrides.items() if v is not None})
