"""The demo's tiny base language model: a LlamaForCausalLM built from a config and pretrained from scratch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyLMSize:
    """Shape of the tiny Llama (a few million parameters at the defaults)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    initializer_range: float = 0.02


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerBase, size: TinyLMSize = TinyLMSize(), seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` sized for ``tokenizer`` (fp32, deterministic init).

    Built by :func:`adamergex_peft.testing.tiny_llama` (tied embeddings, as many key/value heads as
    heads), returned in training mode.
    """
    from adamergex_peft.testing import tiny_llama

    model = tiny_llama(
        seed,
        size.hidden_size,
        tokenizer=tokenizer,
        layers=size.num_layers,
        heads=size.num_heads,
        kv_heads=None,
        intermediate=size.intermediate_size,
        max_positions=size.max_position_embeddings,
        initializer_range=size.initializer_range,
        tie_word_embeddings=True,
    )
    return model.train()


def pretrain_causal_lm(
    model,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    output_dir: str,
    *,
    max_length: int = 128,
    epochs: float = 1.0,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[tuple[int, float]]:
    """Full-parameter causal-LM training of ``model`` on ``texts`` with transformers' ``Trainer``.

    Texts are packed into blocks of ``max_length`` tokens (each text starts with BOS and ends with
    EOS). Returns the logged ``(step, loss)`` pairs; ``model`` is trained in place.
    """
    import torch
    import transformers
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from adamergex_peft.train import PadCollator, TokenizedDataset

    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    blocks = [stream[i : i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)]
    if not blocks:
        raise ValueError(f"pretraining text is shorter than one block of {max_length} tokens")
    dataset = TokenizedDataset([{"input_ids": b, "attention_mask": [1] * len(b), "labels": b} for b in blocks])
    logger.info("pretraining on %d blocks of %d tokens", len(blocks), max_length)
    transformers.set_seed(seed)
    steps = max(1, int(epochs * ((len(blocks) + batch_size - 1) // batch_size)))
    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=max(1, steps // 25),
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not progress,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=PadCollator(tokenizer.pad_token_id))
    if not progress:
        trainer.remove_callback(PrinterCallback)
    trainer.train()
    model.eval()
    return [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
