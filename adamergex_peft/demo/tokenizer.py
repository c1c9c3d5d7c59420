"""A word-level tokenizer built locally (no download): one token per whitespace-separated word.

The builder lives in :mod:`adamergex_peft.testing` (the project's one fixture library); this module
keeps the demo's names: ``build_word_tokenizer(texts, max_vocab=None, min_count=1)`` is
:func:`adamergex_peft.testing.word_tokenizer`.
"""

from __future__ import annotations

from adamergex_peft.testing import WORD_SPECIAL_TOKENS as SPECIAL_TOKENS
from adamergex_peft.testing import word_tokenizer as build_word_tokenizer

__all__ = ["SPECIAL_TOKENS", "build_word_tokenizer"]
