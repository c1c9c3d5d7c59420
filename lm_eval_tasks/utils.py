"""Helpers for the AdaMergeX lm-eval tasks: data loading, answer extraction and metrics.

Everything that the task YAML cannot express lives here: the dataset loader that the YAML
refers to with ``custom_dataset: !function utils.load_adamergex_dataset`` (hub or local
JSONL, plus the paper's seeded sampling), and the ``process_results`` functions that turn
one greedy generation into the paper's metrics. The log-likelihood (``_mc``) tasks add
``acc_calibrated`` and (two choices) ``auc``: their ``process_results`` hand lm-eval one
``(gold, choice log-likelihoods)`` pair per document, and the corpus-level aggregations
(``aggregate_acc_calibrated``, ``aggregate_auc``) calibrate the whole evaluated set with
``adamergex_peft.calibration``.

This module is imported by lm-eval from its file path, so it depends on nothing but the
standard library at import time; ``datasets``, ``rouge_score``, ``numpy`` and
``adamergex_peft.calibration`` (torch) are imported where used.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "ADAMERGEX_DATA_DIR"
"""Environment variable: when set, every task reads ``$ADAMERGEX_DATA_DIR/<task>/<lang>/<split>.jsonl``."""

PAPER_SEED = 112
"""Seed of the paper's evaluation sampling (``random.seed(112); random.sample(docs, k)``)."""

NLI_LABELS = ("entailment", "neutral", "contradiction")
"""XNLI label names in the order of the hub dataset's ``label`` ids (0, 1, 2)."""


# --------------------------------------------------------------------------------------
# Data loading
# --------------------------------------------------------------------------------------


def local_data_path(data_dir: str | os.PathLike[str], task: str, lang: str, split: str) -> Path:
    """Return the JSONL file a task reads in offline mode.

    Args:
        data_dir: The folder named by ``ADAMERGEX_DATA_DIR``.
        task: Task family: ``mgsm``, ``xcopa``, ``xnli``, ``xquad`` or ``xlsum``.
        lang: ISO 639-1 language code (``zh``, not the hub config name ``chinese_simplified``).
        split: The hub split the task evaluates on (``test`` or ``validation``).

    Returns:
        ``<data_dir>/<task>/<lang>/<split>.jsonl`` as an absolute path.
    """
    return Path(data_dir).expanduser().resolve() / task / lang / f"{split}.jsonl"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not a JSON object per line ({err})") from err
    if not rows:
        raise ValueError(f"{path} holds no documents")
    return rows


def _load_from_hub(hf_path: str, hf_name: str | None, split: str) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(hf_path, hf_name, split=split)
    except RuntimeError as err:
        # datasets>=4 refuses repositories that still ship a loading script; the hub keeps
        # an automatic Parquet conversion of them on the "refs/convert/parquet" revision.
        if "scripts are no longer supported" not in str(err):
            raise
        logger.info("%s is script-based; loading its Parquet conversion instead", hf_path)
        return datasets.load_dataset(hf_path, hf_name, split=split, revision="refs/convert/parquet")


def sample_indices(n_docs: int, sample_size: int | None, seed: int = PAPER_SEED) -> list[int] | None:
    """Indices of the paper's evaluation sample, or ``None`` when every document is used.

    Reproduces ``random.seed(seed); random.sample(list(docs), sample_size)`` from the official
    evaluation scripts: the same documents in the same order. When the split has no more
    documents than ``sample_size`` (or ``sample_size`` is ``None``), all documents are kept
    in their original order, as the official scripts did.

    Args:
        n_docs: Number of documents in the split.
        sample_size: Size of the sample (XNLI 1000, XQuAD 1000, XLSum 500; ``None`` for all).
        seed: Seed of a private ``random.Random`` (the global random state is not touched).

    Returns:
        A list of ``sample_size`` distinct indices, or ``None``.
    """
    if sample_size is None or n_docs <= sample_size:
        return None
    if sample_size <= 0:
        raise ValueError(f"sample_size must be positive, got {sample_size}")
    return random.Random(seed).sample(range(n_docs), sample_size)


def load_adamergex_dataset(
    *,
    adamergex_task: str,
    adamergex_lang: str,
    hf_path: str,
    hf_name: str | None,
    eval_split: str,
    sample_size: int | None = None,
    sample_seed: int = PAPER_SEED,
    **_lm_eval_metadata: Any,
) -> datasets.DatasetDict:
    """Load one task's evaluation split, from the hub or from local JSONL, and sample it.

    lm-eval 0.4.13 calls a task's ``custom_dataset`` as
    ``custom_dataset(**metadata, **dataset_kwargs)``; the keyword arguments above come from the
    task YAML's ``dataset_kwargs``, everything else (task version, model arguments, ...) is
    metadata and ignored.

    Data source, decided at load time:
      * ``ADAMERGEX_DATA_DIR`` set: ``$ADAMERGEX_DATA_DIR/<adamergex_task>/<adamergex_lang>/
        <eval_split>.jsonl``, one document per line with the hub dataset's field names. The
        path does not depend on the current directory.
      * otherwise: ``datasets.load_dataset(hf_path, hf_name, split=eval_split)``.

    Both sources then go through the same sampling (:func:`sample_indices`).

    Returns:
        A ``DatasetDict`` with the single split ``eval_split``.
    """
    import datasets

    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        path = local_data_path(data_dir, adamergex_task, adamergex_lang, eval_split)
        if not path.is_file():
            raise FileNotFoundError(
                f"{DATA_DIR_ENV}={data_dir} is set but {path} does not exist; write the "
                f"{hf_path} ({hf_name}) '{eval_split}' split there as JSONL, or unset "
                f"{DATA_DIR_ENV} to load from the Hugging Face hub"
            )
        dataset = datasets.Dataset.from_list(_read_jsonl(path))
        source = str(path)
    else:
        dataset = _load_from_hub(hf_path, hf_name, eval_split)
        source = f"{hf_path}/{hf_name}:{eval_split}"

    indices = sample_indices(len(dataset), sample_size, sample_seed)
    if indices is not None:
        dataset = dataset.select(indices)
    logger.info("adamergex_%s_%s: %d documents from %s", adamergex_task, adamergex_lang, len(dataset), source)
    return datasets.DatasetDict({eval_split: dataset})


# --------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_MARKERS = (
    re.compile(r"####\s*"),
    re.compile(r"the (?:final )?answer is\s*:?\s*\$?", re.IGNORECASE),
)


def extract_number(generation: str) -> float | None:
    """The final numeric answer of an MGSM generation.

    The number after the last ``####`` or "The answer is" marker if there is one, else the last
    number in the generation. Thousands separators (``1,234``) are removed; Unicode digits
    (``٣``, ``３``) are read. Only the generated text is searched: lm-eval passes the
    continuation without the prompt, so a number from the question cannot be picked up.

    Returns:
        The number as a float, or ``None`` when the generation holds no number.
    """
    text = generation
    for marker in _ANSWER_MARKERS:
        hits = list(marker.finditer(text))
        if hits:
            after = _NUMBER.search(text, hits[-1].end())
            if after is not None:
                return _to_float(after.group())
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def _to_float(number: str) -> float | None:
    try:
        return float(number.replace(",", ""))
    except ValueError:
        return None


_CHOICE_PATTERNS = (
    re.compile(r"\(\s*([AB])\s*\)"),
    re.compile(r"\b(?:option|answer|choice)(?:\s+is)?\s*:?\s*\(?([AB])\b", re.IGNORECASE),
    re.compile(r"^\s*([AB])\s*(?:[.:,)]|$)", re.MULTILINE),
)


def _fold(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().strip(" .。!?！？\n\t").split())


def extract_choice(generation: str, choice1: str, choice2: str) -> int | None:
    """The option (0 for A, 1 for B) an XCOPA generation picks, or ``None``.

    In order: the first ``(A)``/``(B)``; "Option/Answer/Choice A/B"; a line that is just ``A``
    or ``B``; otherwise the option whose text appears in the generation when exactly one does.
    Unlike the official script, an unreadable answer is wrong, not silently "A".
    """
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(generation)
        if match:
            return "AB".index(match.group(1).upper())
    folded = _fold(generation)
    found = [i for i, choice in enumerate((choice1, choice2)) if _fold(choice) and _fold(choice) in folded]
    return found[0] if len(found) == 1 else None


_NLI_PATTERN = re.compile(r"entail|neutral|contradict", re.IGNORECASE)
_NLI_STEM_TO_LABEL = {"entail": 0, "neutral": 1, "contradict": 2}


def extract_nli_label(generation: str) -> int | None:
    """The XNLI label id (0 entailment, 1 neutral, 2 contradiction) a generation states first.

    The official script counted a generation as correct when the gold label name occurred
    anywhere in it, so "entailment, contradiction or neutral" matched every document. Here
    the first label word (``entail*``, ``neutral``, ``contradict*``) decides.
    """
    match = _NLI_PATTERN.search(generation)
    return _NLI_STEM_TO_LABEL[match.group().lower()] if match else None


# --------------------------------------------------------------------------------------
# Tokenisation for F1 / ROUGE-L (scripts without spaces between words)
# --------------------------------------------------------------------------------------


def _is_char_token(ch: str) -> bool:
    """Characters of scripts written without spaces between words: one token each."""
    cp = ord(ch)
    return (
        0x0E00 <= cp <= 0x0E7F  # Thai
        or 0x0E80 <= cp <= 0x0EFF  # Lao
        or 0x1780 <= cp <= 0x17FF  # Khmer
        or 0x1000 <= cp <= 0x109F  # Myanmar
        or 0x3040 <= cp <= 0x30FF  # Hiragana, Katakana
        or 0x3400 <= cp <= 0x4DBF  # CJK extension A
        or 0x4E00 <= cp <= 0x9FFF  # CJK unified ideographs
        or 0xF900 <= cp <= 0xFAFF  # CJK compatibility ideographs
        or 0x20000 <= cp <= 0x2FA1F  # CJK extensions B-F, supplement
    )


def multilingual_tokenize(text: str) -> list[str]:
    """Split text into tokens for F1 and ROUGE-L in any of the paper's languages.

    NFKC-normalised and case-folded. Letters, digits and combining marks form words
    (so Devanagari vowel signs and Arabic diacritics stay inside their word), everything
    else separates words. Characters of scripts written without spaces (Chinese, Japanese
    kana, Thai, Lao, Khmer, Myanmar) are one token each, with their combining marks
    attached: character-level scoring, the usual choice for zh/th (MLQA's "mixed
    segmentation"). rouge_score's default tokenizer keeps only ``[a-z0-9]`` and returns no
    tokens at all for Arabic, Hindi, Russian, Greek, Thai or Chinese text.
    """
    tokens: list[str] = []
    word: list[str] = []
    for ch in unicodedata.normalize("NFKC", text).casefold():
        category = unicodedata.category(ch)
        if category[0] == "M":
            # A combining mark belongs to whatever precedes it.
            if word:
                word.append(ch)
            elif tokens:
                tokens[-1] += ch
            continue
        if _is_char_token(ch) and category[0] in "LN":
            if word:
                tokens.append("".join(word))
                word = []
            tokens.append(ch)
        elif category[0] in "LN":
            word.append(ch)
        elif word:
            tokens.append("".join(word))
            word = []
    if word:
        tokens.append("".join(word))
    return tokens


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------

_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> list[str]:
    """SQuAD-style answer normalisation, made script-aware.

    Lower-case (case-fold), drop punctuation (every Unicode punctuation or symbol character,
    not only ASCII), drop the English articles a/an/the, and split into
    :func:`multilingual_tokenize` tokens (words; characters for zh/th).
    """
    return [token for token in multilingual_tokenize(text) if token not in _ARTICLES]


def squad_exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gold) for gold in golds))


def squad_f1(prediction: str, golds: list[str]) -> float:
    """Best token-overlap F1 of the prediction against the gold answers (SQuAD v1.1)."""
    pred = normalize_answer(prediction)
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold)
        if not pred or not ref:
            best = max(best, float(pred == ref))
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred), common / len(ref)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


class MultilingualRougeTokenizer:
    """rouge_score tokenizer interface (``tokenize(text) -> list[str]``) over :func:`multilingual_tokenize`."""

    def tokenize(self, text: str) -> list[str]:
        """Tokenise for ROUGE (no stemming: rouge_score's Porter stemmer is English-only)."""
        return multilingual_tokenize(text)


_ROUGE_SCORER = None


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (in [0, 1]) of one prediction against one reference, computed by rouge_score.

    The official code divided this score by the reference's length in characters; it is not
    divided here.
    """
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=MultilingualRougeTokenizer())
    return float(_ROUGE_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def first_line(generation: str) -> str:
    """The first non-empty line of a generation, stripped (the answer of a one-line task)."""
    for line in generation.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _strip_list_repr(answer: str) -> str:
    """``['foo']`` -> ``foo`` (the only answer format the official XQuAD scorer accepted)."""
    match = re.fullmatch(r"\[\s*(['\"])(.*)\1\s*\]", answer)
    return match.group(2) if match else answer


# --------------------------------------------------------------------------------------
# process_results (lm-eval calls these with the document and [generation])
# --------------------------------------------------------------------------------------


def process_results_mgsm(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """MGSM: accuracy of the final number of the generation against ``answer_number``."""
    predicted = extract_number(results[0])
    gold = float(doc["answer_number"])
    return {"acc": float(predicted is not None and abs(predicted - gold) < 1e-6)}


def process_results_xcopa(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """XCOPA: accuracy of the option read from the generation (see :func:`extract_choice`)."""
    predicted = extract_choice(results[0], doc["choice1"], doc["choice2"])
    return {"acc": float(predicted == int(doc["label"]))}


def process_results_xnli(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """XNLI: accuracy of the label read from the generation (see :func:`extract_nli_label`)."""
    return {"acc": float(extract_nli_label(results[0]) == int(doc["label"]))}


def process_results_xquad(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """XQuAD: exact match and F1 of the first generated line against all gold answers."""
    prediction = _strip_list_repr(first_line(results[0]))
    golds = list(doc["answers"]["text"])
    return {
        "exact_match": squad_exact_match(prediction, golds),
        "f1": squad_f1(prediction, golds),
    }


def process_results_xlsum(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """XLSum: ROUGE-L F1 of the generated summary against the reference summary."""
    return {"rougeL": rouge_l_f1(results[0].strip(), doc["summary"])}


# --------------------------------------------------------------------------------------
# Log-likelihood (multiple-choice) tasks: acc, acc_norm as lm-eval computes them, plus
# label-free calibrated accuracy and AUC (corpus-level aggregations)
# --------------------------------------------------------------------------------------

_CALIBRATION = None


def _calibration():
    """``adamergex_peft.calibration``; from a source checkout or wheel without it on sys.path, by file."""
    global _CALIBRATION
    if _CALIBRATION is None:
        try:
            from adamergex_peft import calibration
        except ImportError:
            here = Path(__file__).resolve().parent
            # Wheel: <site-packages>/adamergex_peft/lm_eval_tasks; source checkout: <repo>/lm_eval_tasks.
            for path in (here.parent / "calibration.py", here.parent / "adamergex_peft" / "calibration.py"):
                if path.is_file():
                    import importlib.util

                    spec = importlib.util.spec_from_file_location("adamergex_peft_calibration", path)
                    calibration = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(calibration)
                    break
            else:
                raise ImportError(
                    "acc_calibrated and auc need adamergex_peft.calibration: pip install adamergex-peft"
                ) from None
        _CALIBRATION = calibration
    return _CALIBRATION


def multiple_choice_results(
    results: list[tuple[float, bool]],
    gold: int,
    choices: list[str] | None = None,
    metrics: tuple[str, ...] = ("acc", "acc_calibrated"),
) -> dict[str, Any]:
    """Per-document values of a multiple-choice task, as lm-eval 0.4.13's built-in scoring plus calibration.

    ``results`` are lm-eval's ``(log-likelihood, is_greedy)`` pairs, one per choice. ``acc`` is
    ``[argmax_j ll_j = gold]`` and ``acc_norm`` ``[argmax_j ll_j / len(choice_j) = gold]``
    (characters; ``np.argmax``, ties to the first choice, exactly as lm-eval's
    ``ConfigurableTask.process_results``); a gold index outside the choices scores 0, as there.
    ``acc_calibrated`` and ``auc`` are the pair ``(gold, [ll_0, ..., ll_{k-1}])``: their value
    needs the whole evaluated set and is computed by :func:`aggregate_acc_calibrated` /
    :func:`aggregate_auc`.

    Args:
        results: lm-eval's per-choice results for one document.
        gold: Index of the correct choice.
        choices: The choice strings (needed for ``acc_norm`` only).
        metrics: Which of ``acc``, ``acc_norm``, ``acc_calibrated``, ``auc`` to return (lm-eval
            wants exactly the metrics of the task's ``metric_list``).
    """
    import numpy as np

    lls = [float(ll) for ll, _ in results]
    gold = int(gold)
    if not 0 <= gold < len(lls):
        gold = -100
    out: dict[str, Any] = {}
    for metric in metrics:
        if metric == "acc":
            out["acc"] = 1.0 if int(np.argmax(lls)) == gold else 0.0
        elif metric == "acc_norm":
            if choices is None or len(choices) != len(lls):
                raise ValueError("acc_norm needs the choice strings, one per log-likelihood")
            lengths = np.array([float(len(choice)) for choice in choices])
            out["acc_norm"] = 1.0 if int(np.argmax(np.array(lls) / lengths)) == gold else 0.0
        elif metric in ("acc_calibrated", "auc"):
            out[metric] = (gold, lls)
        else:
            raise ValueError(f"unknown multiple-choice metric {metric!r}")
    return out


def process_results_xcopa_mc(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, Any]:
    """XCOPA (log-likelihood): ``acc``, ``acc_norm``, ``acc_calibrated``, ``auc`` (choices ``choice1``, ``choice2``)."""
    return multiple_choice_results(
        results,
        int(doc["label"]),
        [doc["choice1"], doc["choice2"]],
        metrics=("acc", "acc_norm", "acc_calibrated", "auc"),
    )


def process_results_xnli_mc(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, Any]:
    """XNLI (log-likelihood): ``acc`` and ``acc_calibrated`` over the three label names."""
    return multiple_choice_results(results, int(doc["label"]), list(NLI_LABELS), metrics=("acc", "acc_calibrated"))


def aggregate_acc_calibrated(items: list[tuple[int, list[float]]]) -> float:
    """Corpus-level ``acc_calibrated``: accuracy after label-free calibration of the whole evaluated set.

    The choice log-likelihoods of all documents get per-answer offsets
    (``adamergex_peft.calibration.prior_offsets``, uniform target) so that every answer is
    predicted equally often, then ``argmax_j (ll_ij + b_j)`` is scored against the gold index.
    The labels are read only to score. NaN (with a warning) where calibration is undefined.
    """
    try:
        return _calibration().calibrated_accuracy_of_items(items)
    except ValueError as err:
        logger.warning("acc_calibrated is undefined for these %d documents: %s", len(items), err)
        return float("nan")


def aggregate_auc(items: list[tuple[int, list[float]]]) -> float:
    """Corpus-level ``auc`` of a two-choice task: ROC AUC of the margin ``ll_1 - ll_0`` for gold 1 vs 0.

    Ties count 1/2. Offsets do not change it: it measures how well the model ranks the
    documents, whatever answer it prefers a priori. NaN (with a warning) when only one gold
    class is present.
    """
    try:
        return _calibration().binary_auc_of_items(items)
    except ValueError as err:
        logger.warning("auc is undefined for these %d documents: %s", len(items), err)
        return float("nan")


__all__ = [
    "DATA_DIR_ENV",
    "NLI_LABELS",
    "PAPER_SEED",
    "MultilingualRougeTokenizer",
    "aggregate_acc_calibrated",
    "aggregate_auc",
    "extract_choice",
    "extract_nli_label",
    "extract_number",
    "first_line",
    "load_adamergex_dataset",
    "local_data_path",
    "multilingual_tokenize",
    "multiple_choice_results",
    "normalize_answer",
    "process_results_mgsm",
    "process_results_xcopa",
    "process_results_xcopa_mc",
    "process_results_xlsum",
    "process_results_xnli",
    "process_results_xnli_mc",
    "process_results_xquad",
    "rouge_l_f1",
    "sample_indices",
    "squad_exact_match",
    "squad_f1",
]
