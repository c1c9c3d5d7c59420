"""Reference-task data: plain text cut into fixed-size windows, streamed with constant memory.

AdaMergeX's reference task is causal language modelling on unlabelled text in each language
(the paper uses Wikipedia). Following the paper, the text of all inputs is concatenated with
newlines removed and cut into windows of ``window_size`` units (512 by default): the first
``window_size - completion_size`` units are the prompt, the last ``completion_size`` the
completion. Units are words (whitespace-separated) for space-delimited languages and characters
for languages written without spaces (Chinese, Japanese, Thai, ...).

JSONL schema (one JSON object per line, UTF-8), shared with :mod:`adamergex_peft.train`::

    {"prompt": "<units 1..511 joined>", "completion": "<separator><unit 512>"}

The completion starts with the separator that joined the units (a space for words, nothing for
characters), so ``prompt + completion`` is exactly the window's text. Windows do not overlap
unless ``stride`` is smaller than ``window_size``; a tail shorter than one window is dropped.

Everything here is a generator: a multi-gigabyte dump is read in fixed-size chunks and only one
window of units is held in memory at a time. The output is deterministic: inputs are read in
the order given (folders in sorted order), with no shuffling.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from adamergex_peft.atomic import atomic_open

logger = logging.getLogger(__name__)

Unit = Literal["word", "char"]

#: Languages written without spaces between words: their unit is the character.
CHARACTER_LANGUAGES: frozenset[str] = frozenset({"zh", "ja", "th", "lo", "km", "my", "bo", "yue", "wuu"})

#: Characters read from a file at a time (keeps memory constant even for one-line dumps).
CHUNK_CHARS = 1 << 16

#: File suffixes read when an input is a folder.
TEXT_SUFFIXES: tuple[str, ...] = (".txt",)


def unit_for_language(lang: str) -> Unit:
    """Return the window unit for a language code: ``"char"`` for zh/ja/th-like scripts, else ``"word"``.

    Region or script subtags are ignored (``zh-Hans``, ``zh_CN`` -> ``zh``).
    """
    if not lang:
        raise ValueError("a language code is required (e.g. 'sw', 'zh')")
    base = lang.replace("_", "-").split("-")[0].lower()
    return "char" if base in CHARACTER_LANGUAGES else "word"


def iter_file_chunks(path: str | os.PathLike[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Yield the text of a UTF-8 file in chunks of at most ``chunk_chars`` characters.

    Chunk boundaries may fall inside a word: :func:`iter_units` joins them back.
    """
    with open(path, encoding="utf-8", errors="replace") as handle:
        while True:
            chunk = handle.read(chunk_chars)
            if not chunk:
                return
            yield chunk


def _expand_paths(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise OSError(f"folder {path} contains no {'/'.join(TEXT_SUFFIXES)} files")
        return files
    return [path]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and Path(source).suffix not in (*TEXT_SUFFIXES, ".jsonl", ".json", ".gz")


def iter_hub_texts(
    dataset_id: str,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
) -> Iterator[str]:
    """Yield the ``text_field`` of every row of a Hugging Face dataset, streamed (no full download).

    Each document is followed by a newline, which the windowing treats as a separator.
    """
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a transformers dependency
        raise ImportError("reading a hub dataset needs `pip install datasets`") from err
    stream = datasets.load_dataset(dataset_id, name=config, split=split, streaming=True)
    for row in stream:
        if text_field not in row:
            raise ValueError(f"dataset {dataset_id!r} has no field {text_field!r}; fields: {sorted(row)}")
        yield str(row[text_field])
        yield "\n"


def iter_source_texts(
    sources: Sequence[str | os.PathLike[str]],
    *,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    chunk_chars: int = CHUNK_CHARS,
) -> Iterator[str]:
    """Yield text pieces from files, folders of ``.txt`` files, or hub dataset ids, in order.

    A source that exists on disk is read as text; anything else that is not path-like is taken
    as a Hugging Face dataset id and streamed.
    """
    if not sources:
        raise ValueError("no input given: pass text files, folders or a hub dataset id")
    for source in sources:
        path = Path(source)
        if path.exists():
            for file in _expand_paths(path):
                logger.info("reading %s", file)
                yield from iter_file_chunks(file, chunk_chars)
                yield "\n"
        elif isinstance(source, str) and _looks_like_hub_id(source):
            logger.info("streaming hub dataset %s", source)
            yield from iter_hub_texts(source, config=dataset_config, split=split, text_field=text_field)
        else:
            raise OSError(f"input {str(source)!r} does not exist")


def iter_units(pieces: Iterable[str], unit: Unit) -> Iterator[str]:
    """Turn a stream of text pieces into a stream of units, with newlines removed.

    ``unit="word"``: whitespace-separated words; a word split across two pieces is rejoined.
    ``unit="char"``: every character except line breaks (other whitespace is kept as text).
    """
    if unit == "word":
        carry = ""
        for piece in pieces:
            if not piece:
                continue
            text = carry + piece
            words = text.split()
            carry = "" if text[-1].isspace() or not words else words.pop()
            yield from words
        if carry:
            yield carry
    elif unit == "char":
        for piece in pieces:
            for char in piece:
                if char not in "\r\n":
                    yield char
    else:
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


def iter_windows(units: Iterable[str], window_size: int = 512, stride: int | None = None) -> Iterator[tuple[str, ...]]:
    """Yield consecutive windows of ``window_size`` units; the next window starts ``stride`` units later.

    ``stride`` defaults to ``window_size`` (no overlap). Only one window is held in memory.
    """
    if window_size < 2:
        raise ValueError(f"window_size must be at least 2, got {window_size}")
    stride = window_size if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    buffer: list[str] = []
    skip = 0
    for item in units:
        if skip:
            skip -= 1
            continue
        buffer.append(item)
        if len(buffer) == window_size:
            yield tuple(buffer)
            if stride >= window_size:
                buffer.clear()
                skip = stride - window_size
            else:
                del buffer[:stride]


@dataclass(frozen=True)
class WindowRecord:
    """One reference-task example: ``prompt + completion`` is the window's text."""

    prompt: str
    completion: str

    def to_json(self) -> str:
        return json.dumps({"prompt": self.prompt, "completion": self.completion}, ensure_ascii=False)


def window_to_record(window: Sequence[str], unit: Unit, completion_size: int = 1) -> WindowRecord:
    """Split a window into a prompt (all but the last ``completion_size`` units) and a completion."""
    if not 1 <= completion_size < len(window):
        raise ValueError(f"completion_size must be in [1, {len(window) - 1}], got {completion_size}")
    sep = " " if unit == "word" else ""
    cut = len(window) - completion_size
    return WindowRecord(prompt=sep.join(window[:cut]), completion=sep + sep.join(window[cut:]))


def iter_reference_records(
    sources: Sequence[str | os.PathLike[str]],
    lang: str,
    *,
    window_size: int = 512,
    completion_size: int = 1,
    stride: int | None = None,
    unit: Unit | None = None,
    max_windows: int | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
) -> Iterator[WindowRecord]:
    """Stream reference-task records for one language (see the module docstring for the format)."""
    if not 1 <= completion_size < window_size:
        raise ValueError(f"completion_size must be in [1, window_size - 1], got {completion_size}")
    unit = unit or unit_for_language(lang)
    pieces = iter_source_texts(sources, dataset_config=dataset_config, split=split, text_field=text_field)
    windows = iter_windows(iter_units(pieces, unit), window_size=window_size, stride=stride)
    for count, window in enumerate(windows):
        if max_windows is not None and count >= max_windows:
            return
        yield window_to_record(window, unit, completion_size)


def build_reference_data(
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    lang: str,
    *,
    window_size: int = 512,
    completion_size: int = 1,
    stride: int | None = None,
    unit: Unit | None = None,
    max_windows: int | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    progress: bool = True,
) -> int:
    """Write the reference-task windows of ``sources`` to ``output`` (JSONL) and return how many.

    Args:
        sources: text files, folders of ``.txt`` files, or Hugging Face dataset ids (streamed).
        output: the JSONL file to write; written to a temporary file and renamed at the end, so
            an interrupted run never leaves a truncated file under that name.
        lang: language code; picks the unit (characters for zh/ja/th, else words) unless
            ``unit`` is given.
        window_size: units per window (the paper: 512 = 511 of prompt + 1 of completion).
        completion_size: units of the window that form the completion.
        stride: units between window starts (default: ``window_size``, no overlap).
        unit: ``"word"`` or ``"char"``, overriding the language's default.
        max_windows: stop after this many windows (the paper uses 10k-50k per language).
        dataset_config, split, text_field: how to read a hub dataset.
        progress: show a tqdm progress bar.

    Returns:
        The number of windows written.
    """
    from tqdm.auto import tqdm

    output = Path(output)
    records = iter_reference_records(
        sources,
        lang,
        window_size=window_size,
        completion_size=completion_size,
        stride=stride,
        unit=unit,
        max_windows=max_windows,
        dataset_config=dataset_config,
        split=split,
        text_field=text_field,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with (
        atomic_open(output, "w", encoding="utf-8", newline="\n") as handle,
        tqdm(total=max_windows, unit="window", desc=f"windows ({lang})", disable=not progress) as bar,
    ):
        for record in records:
            handle.write(record.to_json())
            handle.write("\n")
            count += 1
            bar.update(1)
    if count == 0:
        logger.warning("%s: the input is shorter than one window of %d units; wrote no windows", output, window_size)
    logger.info("wrote %d windows to %s", count, output)
    return count


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file (blank lines skipped), naming the line on a parse error."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err


def write_jsonl(records: Iterable[dict], path: str | os.PathLike[str]) -> int:
    """Write dicts as JSONL atomically; return how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False))
            handle.write("\n")
            count += 1
    return count
