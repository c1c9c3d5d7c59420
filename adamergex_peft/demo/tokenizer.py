"""A word-level tokenizer built locally (no download): one token per whitespace-separated word."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def build_word_tokenizer(texts: Iterable[str], max_vocab: int | None = None, min_count: int = 1):
    """Build a ``PreTrainedTokenizerFast`` whose vocabulary is the words of ``texts``.

    Words are split on whitespace; the ``max_vocab`` most frequent words (ties broken
    alphabetically, so the result is deterministic) with at least ``min_count`` occurrences get an
    id, the rest map to ``<unk>``. A BOS token is prepended to every encoded text, as Llama's
    tokenizer does. Character offsets are exact, so prompt masking by offsets works.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text.split())
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    if max_vocab is not None:
        ranked = ranked[:max_vocab]
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in ranked:
        if word not in vocab:
            vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    from tokenizers import decoders

    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
