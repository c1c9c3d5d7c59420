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

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from adamergex_peft.demo.lm import TinyLMSize

logger = logging.getLogger(__name__)

#: Methods of the table, in order; "oracle" and "base" are not merges.
MERGE_METHODS: tuple[str, ...] = ("task_only", "task_plus_target", "arimerge", "cross", "adamergex")
RESULTS_JSON = "demo_results.json"
CHART_PNG = "demo_results.png"
TABLE_TXT = "demo_table.txt"


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
    """Write an lm-eval multiple-choice task for ``test_file``; return its name."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    name = f"adamergex_demo_{lang}"
    data_file = json.dumps(str(test_file.resolve()))
    (tasks_dir / f"{name}.yaml").write_text(
        "\n".join(
            [
                f"task: {name}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {data_file}",
                "test_split: test",
                "output_type: multiple_choice",
                "doc_to_text: prompt",
                "doc_to_choice: choices",
                "doc_to_target: label",
                "target_delimiter: ' '",
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "metadata:",
                "  version: 1.0",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return name


# ---------------------------------------------------------------------------------- the pipeline


@dataclass
class DemoResult:
    """Everything :func:`run_demo` measured (also written to ``demo_results.json``)."""

    settings: dict[str, Any]
    source: str
    targets: list[str]
    scores: dict[str, dict[str, dict[str, float | None]]]  # family -> row -> lang -> accuracy (None: merge refused)
    source_scores: dict[str, float]  # family -> task adapter's accuracy on the source test set
    training: dict[str, Any]
    timings: dict[str, float]
    errors: list[dict[str, str]] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """Table rows: family, method, per-language scores, mean, share of the gap closed."""
        from adamergex_peft.demo.report import table_rows

        return table_rows(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "source": self.source,
            "targets": self.targets,
            "scores": self.scores,
            "source_scores": self.source_scores,
            "table": self.rows(),
            "training": self.training,
            "timings": self.timings,
            "errors": self.errors,
        }


def _set_determinism(seed: int) -> None:
    import torch
    import transformers

    transformers.set_seed(seed)
    torch.use_deterministic_algorithms(True)


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
    from peft import PeftModel

    import adamergex_peft  # noqa: F401  (attaches PeftModel.merge_crosslingual*)
    from adamergex_peft import AdaMergeXError
    from adamergex_peft.data import build_reference_data, read_jsonl
    from adamergex_peft.demo.lm import build_tiny_llama, pretrain_causal_lm
    from adamergex_peft.demo.tokenizer import build_word_tokenizer
    from adamergex_peft.sweep import SweepPoint, SweepResults, evaluate_points, make_evaluator
    from adamergex_peft.train import resolve_config, train_adapter

    say = log or (lambda _msg: None)
    size = SIZES[size] if isinstance(size, str) else size
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 2)
        clock = now

    _set_determinism(seed)
    # 1. The world.
    if text_dir is None:
        world = output / "world"
        source, targets = write_synthetic_world(world, size, seed)
        say(f"world: synthetic, source {source}, targets {', '.join(targets)} (written to {world})")
    else:
        world = Path(text_dir)
        if not source or not targets:
            raise ValueError("with --text-dir, give --source-lang and --target-langs")
        targets = list(targets)
        check_world(world, source, targets)
        say(f"world: {world}, source {source}, targets {', '.join(targets)}")
    languages = [source, *targets]
    lap("world")

    # 2. Tokenizer and base model.
    if base_model is None:
        texts = {lang: read_lines(world / f"{lang}.txt") for lang in languages}
        task_texts = [
            r["prompt"] + r["completion"] for lang in languages for r in read_jsonl(world / f"{lang}.train.jsonl")
        ]
        tokenizer = build_word_tokenizer([line for lines in texts.values() for line in lines] + task_texts)
        model = build_tiny_llama(tokenizer, size.lm, seed=seed)
        n_params = sum(p.numel() for p in model.parameters())
        pretrain_text = []
        for i in range(size.pretrain_sentences):  # interleave the languages
            pretrain_text += [texts[lang][i] for lang in languages if i < len(texts[lang])]
        say(f"base model: tiny Llama, {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}; pretraining...")
        pretrain_losses = pretrain_causal_lm(
            model,
            tokenizer,
            pretrain_text,
            str(output / "pretrain_checkpoints"),
            max_length=size.pretrain_block,
            batch_size=size.pretrain_batch,
            epochs=size.pretrain_epochs,
            learning_rate=size.pretrain_lr,
            seed=seed,
            progress=progress,
        )
        model.save_pretrained(output / "base_model")
        tokenizer.save_pretrained(output / "base_model")
        say(f"  pretraining loss {pretrain_losses[0][1]:.3f} -> {pretrain_losses[-1][1]:.3f}")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        pretrain_losses = []
        say(f"base model: {base_model}")
    model.eval()
    lap("base_model")

    # 3. Reference data: each language's text cut into windows.
    data_dir = output / "data"
    reference_files = {}
    for lang in languages:
        reference_files[lang] = data_dir / f"ref.{lang}.jsonl"
        if text_dir is None:  # the synthetic text: windows from the part not used for pretraining
            source_file = data_dir / f"text.{lang}.txt"
            data_dir.mkdir(parents=True, exist_ok=True)
            lines = read_lines(world / f"{lang}.txt")[size.pretrain_sentences :]
            source_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            source_file = world / f"{lang}.txt"
        n = build_reference_data(
            [source_file],
            reference_files[lang],
            lang,
            unit="word",
            window_size=size.window_size,
            max_windows=size.reference_windows,
            progress=progress,
        )
        if n == 0:
            raise ValueError(f"{source_file}: not enough text for one window of {size.window_size} words")
    say(f"reference data: {size.reference_windows} windows of {size.window_size} words per language")
    lap("reference_data")

    # 4. Adapters, trained with the same code as `adamergex train`.
    adapters_dir = output / "adapters"
    training: dict[str, Any] = {"pretrain_losses": pretrain_losses}
    jobs = [("task", "task", world / f"{source}.train.jsonl")]
    jobs += [(f"ref_{lang}", "reference", reference_files[lang]) for lang in languages]
    jobs += [(f"oracle_{lang}", "task", world / f"{lang}.train.jsonl") for lang in targets]
    for family in size.families:
        for name, kind, data in jobs:
            config = resolve_config(
                f"cpu-small-{family}",
                {
                    "num_train_epochs": size.reference_epochs if kind == "reference" else size.adapter_epochs,
                    "seed": seed,
                    "full_determinism": True,
                    "logging_steps": 1,
                    "learning_rate": size.lora_lr if family == "lora" else size.ia3_lr,
                    "max_length": max(size.pretrain_block, size.window_size + 8),
                },
            )
            result = train_adapter(
                model,
                data,
                adapters_dir / family / name,
                kind=kind,
                config=config,
                tokenizer=tokenizer,
                progress=progress,
            )
            losses = result.losses
            training[f"{family}/{name}"] = {
                "examples": result.num_examples,
                "steps": result.global_step,
                "first_loss": losses[0][1] if losses else None,
                "last_loss": losses[-1][1] if losses else None,
            }
        say(f"adapters ({family}): task ({source}), reference ({', '.join(languages)}), oracle ({', '.join(targets)})")
    lap("adapters")

    # 5. Evaluation through lm-eval, merging into the base weights and undoing, as `adamergex sweep` does.
    tasks_dir = output / "tasks"
    task_names = {lang: write_task_yaml(tasks_dir, lang, world / f"{lang}.test.jsonl") for lang in languages}
    scores: dict[str, dict[str, dict[str, float | None]]] = {}
    source_scores: dict[str, float] = {}
    errors: list[dict[str, str]] = []
    evaluators = {
        lang: make_evaluator(
            tokenizer,
            [task_names[lang]],
            include_path=str(tasks_dir),
            include_defaults=False,
            batch_size=size.eval_batch_size,
            seed=seed,
            verbosity=None if progress else "ERROR",
            progress=progress,
        )
        for lang in languages
    }
    for family in size.families:
        fam_dir = adapters_dir / family
        peft_model = PeftModel.from_pretrained(model, fam_dir / "task", adapter_name="task")
        for name, _kind, _data in jobs[1:]:
            peft_model.load_adapter(fam_dir / name, adapter_name=name)
        peft_model.eval()
        table: dict[str, dict[str, float]] = {}
        with peft_model.disable_adapter():
            table["base (no adapter)"] = {
                lang: evaluators[lang](peft_model.get_base_model())["score"] for lang in targets
            }
        for lang in targets:
            eval_dir = output / "eval" / f"{family}_{lang}"
            done = SweepResults(settings={"family": family, "lang": lang})
            for method in MERGE_METHODS:
                point = SweepPoint(method, None if method in ("task_only", "arimerge") else float(t))
                try:
                    evaluate_points(
                        peft_model,
                        [point],
                        evaluators[lang],
                        done,
                        eval_dir,
                        adapters=("task", f"ref_{source}", f"ref_{lang}"),
                        progress=progress,
                        plot=False,
                    )
                    table.setdefault(method, {})[lang] = done.points[-1]["score"]
                except AdaMergeXError as err:  # e.g. an (IA)^3 reference vector at or below zero
                    table.setdefault(method, {})[lang] = None
                    errors.append({"family": family, "method": method, "lang": lang, "error": str(err)})
                    say(f"  {family} {method} {lang}: merge refused: {err}")
            oracle = evaluate_points(
                peft_model,
                [SweepPoint("task_only", None)],
                evaluators[lang],
                SweepResults(settings={"family": family, "lang": lang, "adapter": f"oracle_{lang}"}),
                eval_dir / "oracle",
                adapters=(f"oracle_{lang}", f"ref_{source}", f"ref_{lang}"),
                progress=progress,
                plot=False,
            )
            table.setdefault("oracle", {})[lang] = oracle.points[0]["score"]
        src_eval = evaluate_points(
            peft_model,
            [SweepPoint("task_only", None)],
            evaluators[source],
            SweepResults(settings={"family": family, "lang": source}),
            output / "eval" / f"{family}_{source}",
            adapters=("task", f"ref_{source}", f"ref_{targets[0]}"),  # task_only ignores the references
            progress=progress,
            plot=False,
        )
        source_scores[family] = src_eval.points[0]["score"]
        order = ["base (no adapter)", *MERGE_METHODS, "oracle"]
        scores[family] = {row: table[row] for row in order}
        model = peft_model.unload()  # back to the plain base model for the next family
        say(f"evaluated ({family}): {len(order)} rows x {len(targets)} target languages")
    lap("evaluation")

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
        source=source,
        targets=list(targets),
        scores=scores,
        source_scores=source_scores,
        training=training,
        timings=timings,
        errors=errors,
    )
    timings["total"] = round(sum(timings.values()), 2)
    from adamergex_peft.demo.report import write_outputs

    write_outputs(result, output)
    return result


def with_overrides(size: DemoSize, **overrides: Any) -> DemoSize:
    """``size`` with the given fields replaced (``None`` values ignored)."""
    return replace(size, **{k: v for k, v in overrides.items() if v is not None})
