"""Train one PEFT adapter (LoRA or (IA)^3) with transformers' ``Trainer``: the three adapters of AdaMergeX.

AdaMergeX needs a task adapter in the source language and a reference adapter (causal language
modelling on plain text) in the source and in the target language. All three are trained by
:func:`train_adapter`, which ``adamergex train`` calls:

* ``kind="reference"``: the data are windows of plain text (see :mod:`adamergex_peft.data`);
  the model learns ``prompt + completion`` as one sequence, with the loss on every token.
* ``kind="task"``: the data are prompt/completion pairs; by default the loss is on the
  completion only (``loss_on="completion"``) and an end-of-sequence token is appended.

Data: a JSONL file (or a list of dicts) with ``"prompt"`` and ``"completion"`` strings; a row
with only ``"text"`` is read as ``prompt=text, completion=""``. Other keys are ignored.

Settings come from a *recipe*, a JSON file under ``adamergex_peft/recipes/`` (or any JSON path)
holding :class:`TrainConfig` fields, overridden by explicit ``overrides``. Encoder-decoder models
(T5) are supported: the prompt is the encoder input and the completion the target.

The output folder is a standard PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) with ``adamergex_training.json`` beside it recording the
settings and losses; Trainer checkpoints go to ``<output>/checkpoints`` and a run resumes from
the last one with ``resume_from_checkpoint=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from adamergex_peft.atomic import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Kind = Literal["reference", "task"]
IGNORE_INDEX = -100
TRAINING_INFO_NAME = "adamergex_training.json"


@dataclass
class TrainConfig:
    """Every setting of one adapter training run. Recipes are JSON objects of these fields."""

    adapter: Literal["lora", "ia3"] = field(default="lora", metadata={"help": "Adapter type: lora or ia3."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "LoRA target modules; null = PEFT's default for the architecture."}
    )
    ia3_target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "(IA)^3 target modules; null = PEFT's default for the architecture."}
    )
    ia3_feedforward_modules: list[str] | str | None = field(
        default=None, metadata={"help": "(IA)^3 feed-forward modules (subset of the targets); null = PEFT's default."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "PEFT's identity initialisation (False: random, only for tests)."}
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "Training epochs."})
    max_steps: int = field(default=-1, metadata={"help": "Optimiser steps; > 0 overrides num_train_epochs."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch size per device."})
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "Gradient accumulation steps."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps used for warm-up."})
    max_grad_norm: float = field(default=0.3, metadata={"help": "Gradient clipping norm."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    optim: str = field(default="adamw_torch", metadata={"help": "transformers optimiser name."})
    max_length: int = field(default=1024, metadata={"help": "Maximum tokens per example (longer ones are cut)."})
    loss_on: Literal["auto", "all", "completion"] = field(
        default="auto",
        metadata={"help": "Tokens with a loss: all, completion, or auto (reference: all; task: completion)."},
    )
    add_eos: bool | None = field(
        default=None, metadata={"help": "Append EOS to every example; null = yes for task, no for reference."}
    )
    model_dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        default="float32", metadata={"help": "dtype the base model is loaded in (when given by name)."}
    )
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPU)."})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision (GPU)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    save_strategy: Literal["steps", "epoch", "no"] = field(default="steps", metadata={"help": "Checkpointing."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    seed: int = field(default=42, metadata={"help": "Seed for adapter initialisation and data order."})
    full_determinism: bool = field(
        default=False, metadata={"help": "torch deterministic algorithms (slower; for reproducible runs)."}
    )
    max_examples: int | None = field(default=None, metadata={"help": "Use only the first N examples."})

    def __post_init__(self) -> None:
        if self.adapter not in ("lora", "ia3"):
            raise ValueError(f"adapter must be 'lora' or 'ia3', got {self.adapter!r}")
        if self.loss_on not in ("auto", "all", "completion"):
            raise ValueError(f"loss_on must be 'auto', 'all' or 'completion', got {self.loss_on!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set num_train_epochs > 0 or max_steps > 0")
        if self.bf16 and self.fp16:
            raise ValueError("choose bf16 or fp16, not both")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def updated(self, overrides: Mapping[str, Any] | None) -> TrainConfig:
        """Return a copy with ``overrides`` applied (unknown keys are an error naming them)."""
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = sorted(set(overrides) - self.field_names())
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; valid: {sorted(self.field_names())}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------- recipes


def list_recipes() -> dict[str, str]:
    """Return ``{name: description}`` of the recipes shipped in ``adamergex_peft/recipes``."""
    out = {}
    for entry in sorted(resources.files("adamergex_peft.recipes").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            out[entry.name[: -len(".json")]] = json.loads(entry.read_text(encoding="utf-8")).get("description", "")
    return out


def load_recipe(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a recipe's settings: a shipped recipe name (``llama2-7b-lora``) or a JSON file path.

    A recipe file is ``{"description": ..., "settings": {<TrainConfig fields>}}``.
    """
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        entry = resources.files("adamergex_peft.recipes") / f"{name_or_path}.json"
        if not entry.is_file():
            raise ValueError(f"unknown recipe {str(name_or_path)!r}; shipped recipes: {sorted(list_recipes())}")
        text = entry.read_text(encoding="utf-8")
    recipe = json.loads(text)
    settings = recipe.get("settings")
    if not isinstance(settings, dict):
        raise ValueError(f"recipe {str(name_or_path)!r} has no 'settings' object")
    unknown = sorted(set(settings) - TrainConfig.field_names())
    if unknown:
        raise ValueError(f"recipe {str(name_or_path)!r} has unknown setting(s) {unknown}")
    return settings


def resolve_config(
    recipe: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    adapter: str | None = None,
) -> TrainConfig:
    """Defaults, then the recipe, then ``adapter``, then ``overrides`` (later wins)."""
    config = TrainConfig()
    if recipe is not None:
        config = config.updated(load_recipe(recipe))
    if adapter is not None:
        config = config.updated({"adapter": adapter})
    return config.updated(overrides)


# ------------------------------------------------------------------------------------ tokenisation


def load_examples(data: str | os.PathLike[str] | Iterable[Mapping[str, Any]], limit: int | None = None) -> list[dict]:
    """Read prompt/completion examples from a JSONL path or an iterable of dicts."""
    from adamergex_peft.data import read_jsonl

    rows = read_jsonl(data) if isinstance(data, (str, os.PathLike)) else iter(data)
    examples = []
    for number, row in enumerate(rows, 1):
        if limit is not None and len(examples) >= limit:
            break
        if "prompt" in row or "completion" in row:
            prompt, completion = row.get("prompt", ""), row.get("completion", "")
        elif "text" in row:
            prompt, completion = row["text"], ""
        else:
            raise ValueError(f"example {number} has neither 'prompt'/'completion' nor 'text': keys {sorted(row)}")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(f"example {number}: 'prompt' and 'completion' must be strings")
        examples.append({"prompt": prompt, "completion": completion})
    if not examples:
        raise ValueError(f"no training examples in {data if isinstance(data, (str, os.PathLike)) else 'the data'}")
    return examples


def effective_loss_on(config: TrainConfig, kind: Kind) -> str:
    if config.loss_on != "auto":
        return config.loss_on
    return "all" if kind == "reference" else "completion"


def tokenize_causal(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    completion: str,
    *,
    max_length: int,
    loss_on: str,
    add_eos: bool,
) -> dict[str, list[int]] | None:
    """Tokenise ``prompt + completion`` for a causal LM; labels are ``-100`` where there is no loss.

    With ``loss_on="completion"`` the first labelled token is the first one whose text ends after
    the prompt (character offsets, so the text is tokenised as one string, exactly as at
    inference). Returns ``None`` when no token is left to learn from.
    """
    text = prompt + completion
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=fast)
    ids = list(enc["input_ids"])
    if loss_on == "completion":
        if fast:
            offsets = enc["offset_mapping"]
            first = next((i for i, (s, e) in enumerate(offsets) if e > s and e > len(prompt)), len(ids))
        else:  # slow tokenizer: count the prompt's own tokens
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id:
                prompt_ids = prompt_ids[:-1]
            first = len(prompt_ids)
    else:
        first = 0
    if add_eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    labels = [IGNORE_INDEX] * first + ids[first:]
    if len(ids) > max_length:
        # Keep the end when only the completion counts (it is at the end), else the beginning.
        keep = slice(len(ids) - max_length, None) if loss_on == "completion" else slice(0, max_length)
        ids, labels = ids[keep], labels[keep]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_seq2seq(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, *, max_length: int
) -> dict[str, list[int]] | None:
    """Tokenise for an encoder-decoder model: prompt -> encoder, completion -> labels."""
    source = tokenizer(prompt, truncation=True, max_length=max_length)
    target = tokenizer(text_target=completion.strip(), truncation=True, max_length=max_length)
    if not target["input_ids"]:
        return None
    return {
        "input_ids": list(source["input_ids"]),
        "attention_mask": list(source["attention_mask"]),
        "labels": list(target["input_ids"]),
    }


class TokenizedDataset:
    """A list of tokenised examples usable as a torch ``Dataset`` (``__len__``/``__getitem__``)."""

    def __init__(self, items: Sequence[dict[str, list[int]]]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


class PadCollator:
    """Right-pads ``input_ids``/``attention_mask`` with the pad token and ``labels`` with -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Mapping[str, list[int]]]) -> dict[str, Any]:
        import torch

        batch: dict[str, Any] = {}
        for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
            width = max(len(f[key]) for f in features)
            batch[key] = torch.tensor([list(f[key]) + [pad] * (width - len(f[key])) for f in features])
        return batch


def tokenize_examples(
    examples: Sequence[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    config: TrainConfig,
    kind: Kind,
    *,
    encoder_decoder: bool = False,
) -> tuple[TokenizedDataset, int]:
    """Tokenise all examples; return the dataset and how many were skipped (nothing to learn)."""
    loss_on = effective_loss_on(config, kind)
    add_eos = (kind == "task") if config.add_eos is None else config.add_eos
    items, skipped = [], 0
    for ex in examples:
        if encoder_decoder:
            item = tokenize_seq2seq(tokenizer, ex["prompt"], ex["completion"], max_length=config.max_length)
        else:
            item = tokenize_causal(
                tokenizer,
                ex["prompt"],
                ex["completion"],
                max_length=config.max_length,
                loss_on=loss_on,
                add_eos=add_eos,
            )
        if item is None:
            skipped += 1
        else:
            items.append(item)
    if skipped:
        logger.warning("skipped %d example(s) with no token to learn from (empty or cut off completion)", skipped)
    if not items:
        raise ValueError("no example has a token to learn from: check the data and max_length")
    return TokenizedDataset(items), skipped


# --------------------------------------------------------------------------------------- training


def build_peft_config(config: TrainConfig, encoder_decoder: bool = False, inference_mode: bool = False):
    """The ``peft`` LoraConfig/IA3Config for ``config``."""
    from peft import IA3Config, LoraConfig, TaskType

    task_type = TaskType.SEQ_2_SEQ_LM if encoder_decoder else TaskType.CAUSAL_LM
    if config.adapter == "lora":
        return LoraConfig(
            task_type=task_type,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            init_lora_weights=config.init_weights,
            inference_mode=inference_mode,
        )
    return IA3Config(
        task_type=task_type,
        target_modules=config.ia3_target_modules,
        feedforward_modules=config.ia3_feedforward_modules,
        init_ia3_weights=config.init_weights,
        inference_mode=inference_mode,
    )


def load_base_model(name_or_path: str, config: TrainConfig) -> PreTrainedModel:
    """Load a causal or encoder-decoder LM by name/path in ``config.model_dtype``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    model_config = AutoConfig.from_pretrained(name_or_path)
    auto = AutoModelForSeq2SeqLM if getattr(model_config, "is_encoder_decoder", False) else AutoModelForCausalLM
    dtype = config.model_dtype if config.model_dtype == "auto" else getattr(torch, config.model_dtype)
    return auto.from_pretrained(name_or_path, dtype=dtype)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ValueError("the tokenizer has no pad, eos or unk token to pad with")
    return tokenizer.pad_token_id


@dataclass
class TrainResult:
    """What :func:`train_adapter` produced."""

    output_dir: Path
    config: TrainConfig
    kind: str
    num_examples: int
    num_skipped: int
    global_step: int
    train_loss: float | None
    losses: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "kind": self.kind,
            "num_examples": self.num_examples,
            "num_skipped": self.num_skipped,
            "global_step": self.global_step,
            "train_loss": self.train_loss,
            "losses": [list(p) for p in self.losses],
            "config": self.config.to_dict(),
        }


def train_adapter(
    base_model: str | PreTrainedModel,
    data: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    output_dir: str | os.PathLike[str],
    *,
    kind: Kind = "task",
    adapter: Literal["lora", "ia3"] | None = None,
    recipe: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    config: TrainConfig | None = None,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    resume_from_checkpoint: bool | str | None = None,
    progress: bool = True,
    callbacks: Sequence[Any] | None = None,
) -> TrainResult:
    """Train one LoRA/(IA)^3 adapter and save it as a standard PEFT adapter folder in ``output_dir``.

    Args:
        base_model: model name/path, or a loaded ``PreTrainedModel``. A model object is trained in
            place (adapter layers injected, base weights frozen) and restored with PEFT's
            ``unload()`` afterwards, so the same object can train the next adapter.
        data: JSONL path or iterable of ``{"prompt", "completion"}`` dicts.
        output_dir: where the adapter is saved (checkpoints go to ``output_dir/checkpoints``).
        kind: ``"reference"`` (causal LM, loss on all tokens) or ``"task"`` (loss on the completion).
        adapter: ``"lora"`` or ``"ia3"``; overrides the recipe's.
        recipe: shipped recipe name or JSON path (see :func:`list_recipes`).
        overrides: :class:`TrainConfig` fields that win over the recipe.
        config: a complete :class:`TrainConfig` (then ``recipe``/``adapter``/``overrides`` must be unset).
        tokenizer: tokenizer or its name/path (default: ``base_model``'s).
        resume_from_checkpoint: ``True`` for the last checkpoint in ``output_dir/checkpoints``, or a path.
        progress: show Trainer's progress bar (otherwise nothing is printed).
        callbacks: extra ``TrainerCallback`` objects.

    Returns:
        A :class:`TrainResult` with the logged losses.
    """
    if kind not in ("reference", "task"):
        raise ValueError(f"kind must be 'reference' or 'task', got {kind!r}")
    if config is None:
        config = resolve_config(recipe, overrides, adapter)
    elif recipe is not None or overrides or adapter is not None:
        raise ValueError("pass either config or recipe/adapter/overrides, not both")
    output_dir = Path(output_dir)
    model, base_name, owns_model = _resolve_model(base_model, config)
    tokenizer = _resolve_tokenizer(base_model, tokenizer)
    pad_id = _ensure_pad_token(tokenizer)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    examples = load_examples(data, config.max_examples)
    dataset, skipped = tokenize_examples(examples, tokenizer, config, kind, encoder_decoder=encoder_decoder)
    logger.info("training a %s %s adapter on %d examples", kind, config.adapter, len(dataset))

    with scoped_determinism():  # Trainer(full_determinism=True) switches process-global torch settings on
        trainer = _build_trainer(model, dataset, pad_id, config, output_dir, encoder_decoder, progress, callbacks)
        if resume_from_checkpoint is True and not any((output_dir / "checkpoints").glob("checkpoint-*")):
            logger.info("no checkpoint in %s/checkpoints: starting from scratch", output_dir)
            resume_from_checkpoint = None
        try:
            train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
            output_dir.mkdir(parents=True, exist_ok=True)
            trainer.model.save_pretrained(str(output_dir))
        finally:
            if not owns_model:
                trainer.model.unload()  # restore the caller's model (adapter layers removed)
    return _save_result(trainer, train_output, output_dir, config, kind, len(dataset), skipped, base_name)


#: Environment variables that ``transformers.enable_full_determinism`` sets.
_DETERMINISM_ENV = (
    "CUDA_LAUNCH_BLOCKING",
    "CUBLAS_WORKSPACE_CONFIG",
    "ASCEND_LAUNCH_BLOCKING",
    "HCCL_DETERMINISTIC",
    "FLASH_ATTENTION_DETERMINISTIC",
)


@contextmanager
def scoped_determinism(seed: int | None = None) -> Iterator[None]:
    """Restore torch's deterministic-algorithm and cuDNN flags and the related variables on exit.

    With ``seed``, also seed everything and turn deterministic algorithms on inside the block
    (``transformers.enable_full_determinism``); without, only what the block itself switches on
    (e.g. a ``Trainer`` with ``full_determinism=True``) is undone.
    """
    import torch

    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    env = {name: os.environ.get(name) for name in _DETERMINISM_ENV}
    try:
        if seed is not None:
            import transformers

            transformers.enable_full_determinism(seed)
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _resolve_model(base_model: str | PreTrainedModel, config: TrainConfig) -> tuple[PreTrainedModel, str, bool]:
    """(model, its name for the record, whether train_adapter loaded it itself)."""
    if isinstance(base_model, (str, os.PathLike)):
        return load_base_model(str(base_model), config), str(base_model), True
    name = getattr(getattr(base_model, "config", None), "name_or_path", "") or type(base_model).__name__
    return base_model, name, False


def _resolve_tokenizer(
    base_model: str | PreTrainedModel, tokenizer: str | PreTrainedTokenizerBase | None
) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        if not isinstance(base_model, (str, os.PathLike)):
            raise ValueError("pass tokenizer= when base_model is a model object")
        return load_tokenizer(str(base_model))
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(str(tokenizer))
    return tokenizer


def _training_arguments(config: TrainConfig, output_dir: Path, progress: bool):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio of the total steps
        max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay,
        optim=config.optim,
        bf16=config.bf16,
        fp16=config.fp16,
        logging_steps=config.logging_steps,
        save_strategy=config.save_strategy,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        full_determinism=config.full_determinism,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not progress,
        **({"gradient_checkpointing": True} if config.gradient_checkpointing else {}),
    )


def _build_trainer(model, dataset, pad_id, config, output_dir, encoder_decoder, progress, callbacks):
    """Seed, inject the adapter (``get_peft_model``) and build the ``Trainer``."""
    import transformers
    from peft import get_peft_model
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    if config.full_determinism:
        transformers.enable_full_determinism(config.seed)
    else:
        transformers.set_seed(config.seed)
    peft_model = get_peft_model(model, build_peft_config(config, encoder_decoder))
    if config.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    trainer = Trainer(
        model=peft_model,
        args=_training_arguments(config, output_dir, progress),
        train_dataset=dataset,
        data_collator=PadCollator(pad_id),
        callbacks=list(callbacks or []),
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)
    return trainer


def _save_result(trainer, train_output, output_dir, config, kind, num_examples, skipped, base_name) -> TrainResult:
    """The :class:`TrainResult`, also written to ``adamergex_training.json`` beside the adapter."""
    losses = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    train_loss = getattr(train_output, "training_loss", None)
    result = TrainResult(
        output_dir=output_dir,
        config=config,
        kind=kind,
        num_examples=num_examples,
        num_skipped=skipped,
        global_step=int(trainer.state.global_step),
        train_loss=None if train_loss is None or math.isnan(train_loss) else float(train_loss),
        losses=losses,
    )
    info = {"base_model": base_name, **result.to_dict()}
    atomic_write_text(output_dir / TRAINING_INFO_NAME, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return result
