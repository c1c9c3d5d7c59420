"""Tiny models, tokenizers, adapters and lm-eval task files built in code, offline.

The one fixture library of the project (like ``transformers.testing_utils``): the tests, the
benchmarks and ``adamergex demo`` build their models, tokenizers, random adapters and local
lm-eval tasks with the functions here. ``import adamergex_peft`` does not import this module, and
this module imports torch, transformers, peft and tokenizers only inside the functions that use
them.

Adapters are created with ``init_lora_weights=False`` / ``init_ia3_weights=False`` and then
perturbed (:func:`randomize_`), so that they are never identity: ``lora_B`` is not zero and the
(IA)^3 vectors are not all ones (but stay positive, a valid (IA)^3 denominator).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adamergex_peft.data import write_jsonl  # noqa: F401  (re-exported: the JSONL writer for task data)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from peft import PeftModel
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast

#: Vocabulary size of :func:`tiny_llama` / :func:`tiny_gpt2` when no tokenizer is given.
VOCAB = 64

# ----------------------------------------------------------------------------------------- models


def tiny_llama(
    seed: int = 0,
    hidden: int = 32,
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    vocab_size: int = VOCAB,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = 2,
    intermediate: int | None = None,
    max_positions: int = 64,
    initializer_range: float = 0.02,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A random ``LlamaForCausalLM`` in eval mode, fp32, initialised from ``torch.manual_seed(seed)``.

    With ``tokenizer`` the vocabulary and the BOS/EOS/PAD ids are the tokenizer's (and the
    generation config's pad id is set); otherwise ``vocab_size`` tokens with ids 1/2/0.
    ``kv_heads=None`` means as many key/value heads as heads; ``intermediate`` defaults to ``2 * hidden``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is not None:
        vocab_size = len(tokenizer)
        ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    else:
        ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        **ids,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2 (its Conv1D layers need LoRA with ``fan_in_fan_out=True``)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def save_model(model, tokenizer, folder: str | Path) -> Path:
    """Save ``model`` and ``tokenizer`` into one folder (loadable with ``from_pretrained``)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------- tokenizers
#: Special tokens of :func:`word_tokenizer` (Llama-style: BOS prepended to every text).
WORD_SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def word_tokenizer(texts: Iterable[str], max_vocab: int | None = None, min_count: int = 1) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` whose vocabulary is the whitespace-separated words of ``texts``.

    The ``max_vocab`` most frequent words (ties broken alphabetically, so the result is
    deterministic) with at least ``min_count`` occurrences get an id, the rest map to ``<unk>``. A
    BOS token is prepended to every encoded text, as Llama's tokenizer does. Character offsets are
    exact, so prompt masking by offsets works.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text.split())
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    if max_vocab is not None:
        ranked = ranked[:max_vocab]
    vocab = {tok: i for i, tok in enumerate(WORD_SPECIAL_TOKENS.values())}
    for word in ranked:
        if word not in vocab:
            vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=WORD_SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = WORD_SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, **WORD_SPECIAL_TOKENS)


def bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 320,
    *,
    unk_token: str | None = "<unk>",
    pad_token: str | None = None,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` here (GPT-2 style: any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"unk_token": unk_token, "pad_token": pad_token, "bos_token": bos_token, "eos_token": eos_token}
    specials = {k: v for k, v in specials.items() if v is not None}
    core = Tokenizer(models.BPE(unk_token=unk_token))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials)


# --------------------------------------------------------------------------------------- adapters


def randomize_(model: PeftModel, adapter_name: str, seed: int, *, std: float = 0.2, only: str | None = None) -> None:
    """Give an adapter random, non-identity weights (lora_B is zero after some inits; ia3_l is ones).

    LoRA factors become ``std * N(0, 1)``; (IA)^3 vectors ``|1 + 0.3 N(0, 1)|`` clamped to at least
    0.2 (positive, away from zero). ``only``: change only the parameters whose name contains it
    (e.g. ``"lora_B"``). Parameters are visited in ``named_parameters`` order, from one generator.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not (f".{adapter_name}." in name or name.endswith(f".{adapter_name}")):
                continue
            if only is not None and only not in name:
                continue
            if "ia3_l" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
                param.abs_().clamp_(min=0.2)
            else:
                param.copy_(std * torch.randn(param.shape, generator=gen))


def _adapter_model(base, config_cls, adapters: Mapping[str, dict], seed: int, **defaults) -> PeftModel:
    from peft import get_peft_model

    model = None
    for i, (name, kwargs) in enumerate(adapters.items()):
        config = config_cls(**{**defaults, **kwargs})
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        randomize_(model, name, seed + i)
    model.eval()
    return model


def lora_model(base, adapters: Mapping[str, dict], seed: int = 1) -> PeftModel:
    """A PeftModel with one random LoRA adapter per entry of ``adapters`` (name -> LoraConfig kwargs)."""
    from peft import LoraConfig

    return _adapter_model(base, LoraConfig, adapters, seed, init_lora_weights=False, lora_dropout=0.0)


def ia3_model(base, adapters: Mapping[str, dict], seed: int = 1) -> PeftModel:
    """A PeftModel with one random (IA)^3 adapter per entry of ``adapters`` (name -> IA3Config kwargs)."""
    from peft import IA3Config

    return _adapter_model(base, IA3Config, adapters, seed, init_ia3_weights=False)


#: LoRA and (IA)^3 adapter settings for :func:`save_adapter` (Llama module names).
LLAMA_LORA_DEFAULT = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
LLAMA_IA3_DEFAULT = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}


def save_adapter(base: str | Path, peft_type: str, seed: int, out: str | Path, settings: dict | None = None) -> Path:
    """Save a random (non-identity) ``"lora"`` or ``"ia3"`` adapter for the model in folder ``base``.

    ``settings``: LoraConfig / IA3Config keyword arguments (default :data:`LLAMA_LORA_DEFAULT` /
    :data:`LLAMA_IA3_DEFAULT`).
    """
    from transformers import AutoModelForCausalLM

    if peft_type not in ("lora", "ia3"):
        raise ValueError(f"peft_type must be 'lora' or 'ia3', not {peft_type!r}")
    default = LLAMA_LORA_DEFAULT if peft_type == "lora" else LLAMA_IA3_DEFAULT
    build = lora_model if peft_type == "lora" else ia3_model
    model = build(AutoModelForCausalLM.from_pretrained(base), {"default": settings or default}, seed=seed)
    model.save_pretrained(out)
    return Path(out)


def adapter_snapshot(model: PeftModel) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (to check that nothing changed)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: PeftModel, snapshot: dict[str, torch.Tensor]) -> None:
    """Assert that ``model``'s state dict equals ``snapshot`` bit for bit (NaN positions included)."""
    import torch

    now = model.state_dict()
    assert set(now) == set(snapshot), sorted(set(now) ^ set(snapshot))[:5]
    for key, value in snapshot.items():
        same = torch.equal(torch.isnan(now[key]), torch.isnan(value)) and torch.equal(
            now[key].nan_to_num(), value.nan_to_num()
        )
        assert same, f"{key} changed"


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """Written out here, independently of the library: alpha/r, or alpha/sqrt(r) under rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def module_scaling(spec: Mapping[str, dict], adapter: str, module: str) -> float:
    """The scaling of ``adapter`` on ``module`` from the adapter kwargs, rank/alpha patterns included."""
    kw = spec[adapter]
    r = next((v for k, v in kw.get("rank_pattern", {}).items() if module.endswith(k)), kw["r"])
    alpha = next((v for k, v in kw.get("alpha_pattern", {}).items() if module.endswith(k)), kw["lora_alpha"])
    return lora_scaling(alpha, r, kw.get("use_rslora", False))


# Three LoRA adapters with different ranks, alphas, rsLoRA, rank/alpha patterns, and target modules
# that only partly overlap.
LLAMA_LORA = {
    "task": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    "ref_en": {"r": 2, "lora_alpha": 3, "target_modules": ["q_proj", "down_proj", "up_proj"], "use_rslora": True},
    "ref_sw": {
        "r": 6,
        "lora_alpha": 5,
        "target_modules": ["q_proj", "v_proj", "k_proj", "up_proj"],
        "rank_pattern": {"k_proj": 3},
        "alpha_pattern": {"up_proj": 7},
    },
}

GPT2_LORA = {
    "task": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
    "ref_en": {"r": 3, "lora_alpha": 4, "target_modules": ["c_attn"], "fan_in_fan_out": True, "use_rslora": True},
    "ref_sw": {"r": 2, "lora_alpha": 2, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True},
}

# Same rank and alpha everywhere: what the factor-level formulas (factorwise, arimerge, cross) need.
LLAMA_LORA_UNIFORM = {
    "task": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "ref_en": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "ref_sw": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]},
}

# (IA)^3 on GPT-2: c_attn (attention, with a bias) and mlp.c_proj (feed-forward), Conv1D layers.
GPT2_IA3 = {
    "task": {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]},
    "ref_en": {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]},
    "ref_sw": {"target_modules": ["c_attn"], "feedforward_modules": []},
}

# (IA)^3 on attention (k, v) and feed-forward (down) modules, partly overlapping.
LLAMA_IA3 = {
    "task": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "ref_en": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "ref_sw": {"target_modules": ["k_proj", "down_proj", "up_proj"], "feedforward_modules": ["down_proj", "up_proj"]},
}


# ------------------------------------------------------------------------------ lm-eval task files


def write_task_yaml(
    tasks_dir: str | Path,
    task: str,
    data_file: str | Path,
    *,
    output_type: str = "multiple_choice",
    doc_to_text: str,
    doc_to_target: str,
    doc_to_choice: str | None = None,
    metrics: Sequence[str | Mapping[str, Any]] = ("acc",),
    split: str = "test",
    generation_kwargs: Mapping[str, Any] | None = None,
    version: float = 1.0,
    **extra: Any,
) -> Path:
    """Write ``<tasks_dir>/<task>.yaml``: an lm-eval task reading the local JSONL ``data_file``.

    The data file is loaded with ``datasets``' ``json`` builder as split ``split``. ``metrics`` are
    metric names or full ``metric_list`` entries; ``extra`` keys (``target_delimiter``,
    ``metadata``, ...) are written as given (``metadata`` defaults to ``{version: version}``). Values are
    written as JSON, which YAML reads unchanged, except strings ``"!function utils.fn"`` (anywhere,
    e.g. ``process_results`` or a metric's ``aggregation``), written as lm-eval's ``!function`` tag.
    Returns the YAML path.
    """
    config: dict[str, Any] = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(Path(data_file).resolve())}},
        "test_split": split,
        "output_type": output_type,
        "doc_to_text": doc_to_text,
    }
    if doc_to_choice is not None:
        config["doc_to_choice"] = doc_to_choice
    config["doc_to_target"] = doc_to_target
    if generation_kwargs is not None:
        config["generation_kwargs"] = dict(generation_kwargs)
    config["metric_list"] = [{"metric": m} if isinstance(m, str) else dict(m) for m in metrics]
    config["metadata"] = {"version": version}
    config.update(extra)
    tasks_dir = Path(tasks_dir)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    path = tasks_dir / f"{task}.yaml"
    path.write_text("".join(f"{key}: {_yaml_value(value)}\n" for key, value in config.items()), encoding="utf-8")
    return path


def _yaml_value(value: Any) -> str:
    """A flow-style YAML value: JSON, except strings ``"!function module.name"``, which stay YAML tags."""
    if isinstance(value, str) and value.startswith("!function "):
        return value
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return json.dumps(value)


# ---------------------------------------------------------------------------------- sweep fixtures
#: The vocabulary of the tiny two-choice topic task the sweep tests evaluate.
TOPIC_WORDS: tuple[str, ...] = tuple("ana bo eat read apple book food study topic : .".split())


def topic_sweep_models(root: str | Path, adapters: Sequence[str], seed: int) -> Path:
    """A tiny word-level Llama saved at ``root/base`` and one random LoRA adapter (r=4, q/v) per name.

    The adapters get seeds ``seed, seed + 1, ...`` in the order of ``adapters``. A large init (0.3):
    a random model's output layer is nearly flat at the usual 0.02. Returns the base folder.
    """
    root = Path(root)
    tokenizer = word_tokenizer([" ".join(TOPIC_WORDS)])
    base = tiny_llama(tokenizer=tokenizer, heads=2, kv_heads=None, max_positions=256, initializer_range=0.3)
    save_model(base, tokenizer, root / "base")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    for offset, name in enumerate(adapters):
        save_adapter(root / "base", "lora", seed + offset, root / name, settings=lora)
    return root / "base"


def topic_rows(objects: Sequence[str]) -> list[dict[str, Any]]:
    """Items of the two-choice topic task: "<s> <v> the <o> . topic :" -> food (0) / study (1, for book and study)."""
    return [
        {"prompt": f"{s} {v} the {o} . topic :", "choices": ["food", "study"], "label": int(o in ("book", "study"))}
        for s in ("ana", "bo")
        for v in ("eat", "read")
        for o in objects
    ]
