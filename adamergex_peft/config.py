"""Configuration of an AdaMergeX merge (PEFT-style dataclass, no torch import)."""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from adamergex_peft.errors import AdaMergeXError

CONFIG_NAME = "adamergex_config.json"

METHODS = ("adamergex", "cross", "arimerge", "task_only", "task_plus_target")
LORA_STRATEGIES = ("exact", "svd", "factorwise")
IA3_STRATEGIES = ("linear", "power")


@dataclass
class AdaMergeXConfig:
    """Which adapters to merge and how.

    AdaMergeX (Zhao et al., NAACL 2025) builds a target-language task adapter from a source-language
    task adapter ``T`` and two reference adapters trained on plain text (causal LM) in the source
    language (``Rs``) and the target language (``Rg``)::

        A(g, T) = A(s, T) (+) t * (A(g, R) (-) A(s, R))

    where ``(+)``/``(-)`` follow the adapter's structure: addition/subtraction for LoRA
    (``dW = dW_T + t (dW_Rg - dW_Rs)``), multiplication/division for (IA)^3
    (``l = l_T * (t (l_Rg / l_Rs - 1) + 1)``, or ``l_T * (l_Rg / l_Rs) ** t``).

    The adapter fields name adapters loaded in a ``PeftModel`` (for
    :func:`~adamergex_peft.merge_crosslingual`); for
    :func:`~adamergex_peft.merge_adapter_files` they are replaced by the folder paths.
    """

    task_adapter: str = field(
        default=None, metadata={"help": "Adapter trained on the target task in the source language (T)."}
    )
    source_reference_adapter: str = field(
        default=None,
        metadata={"help": "Reference adapter (causal LM on plain text) in the source language (Rs)."},
    )
    target_reference_adapter: str = field(
        default=None,
        metadata={"help": "Reference adapter (causal LM on plain text) in the target language (Rg)."},
    )
    t: float = field(
        default=1.0,
        metadata={
            "help": "Scale of the language gap: 0 gives the task adapter as is, 1 the literal analogy. Any finite float."
        },
    )
    method: str = field(
        default="adamergex",
        metadata={
            "help": (
                "'adamergex' (structure-adaptive operators), or a baseline of the paper: 'cross' (the mismatched "
                "operators), 'arimerge' (Zhang et al. 2023), 'task_only' (Eng-FT: the task adapter as is), "
                "'task_plus_target' (task + t * target reference, no subtraction)."
            )
        },
    )
    lora_strategy: str = field(
        default="exact",
        metadata={
            "help": (
                "How a LoRA result is represented. 'exact': stacked factors of rank r_T + r_Rg + r_Rs, equal to the "
                "formula. 'svd': the exact update truncated to `svd_rank` (lossy). 'factorwise': A and B combined "
                "separately, as the official code does (NOT the paper's equation; needs equal ranks and scalings)."
            )
        },
    )
    ia3_strategy: str = field(
        default="linear",
        metadata={
            "help": "(IA)^3 operator. 'linear': l_T * (t (l_Rg / l_Rs - 1) + 1) (official code). "
            "'power': l_T * (l_Rg / l_Rs) ** t."
        },
    )
    svd_rank: int | None = field(
        default=None,
        metadata={"help": "Rank of the result for lora_strategy='svd'. Default: the task adapter's rank."},
    )
    arimerge_weights: tuple[float, float] = field(
        default=(0.5, 0.5),
        metadata={"help": "(c0, c1): weights of the task and the language module for method='arimerge'."},
    )

    def __post_init__(self) -> None:
        for name in ("task_adapter", "source_reference_adapter", "target_reference_adapter"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise AdaMergeXError(f"AdaMergeXConfig.{name} must be a non-empty adapter name, got {value!r}.")
        if self.source_reference_adapter == self.target_reference_adapter:
            raise AdaMergeXError(
                "AdaMergeXConfig: source_reference_adapter and target_reference_adapter are the same adapter "
                f"({self.source_reference_adapter!r}); the language gap would be zero."
            )
        if self.task_adapter in (self.source_reference_adapter, self.target_reference_adapter):
            raise AdaMergeXError(
                f"AdaMergeXConfig: task_adapter {self.task_adapter!r} is also used as a reference adapter."
            )
        if not _is_finite_real(self.t):
            raise AdaMergeXError(f"AdaMergeXConfig.t must be a finite number, got {self.t!r}.")
        self.t = float(self.t)
        _check_choice("method", self.method, METHODS)
        _check_choice("lora_strategy", self.lora_strategy, LORA_STRATEGIES)
        _check_choice("ia3_strategy", self.ia3_strategy, IA3_STRATEGIES)
        if self.svd_rank is not None:
            if isinstance(self.svd_rank, bool) or not isinstance(self.svd_rank, numbers.Integral) or self.svd_rank < 1:
                raise AdaMergeXError(
                    f"AdaMergeXConfig.svd_rank must be a positive int or None, got {self.svd_rank!r}."
                )
            self.svd_rank = int(self.svd_rank)
        try:
            weights = tuple(self.arimerge_weights)
        except TypeError:
            weights = ()
        if len(weights) != 2 or not all(_is_finite_real(w) for w in weights):
            raise AdaMergeXError(
                f"AdaMergeXConfig.arimerge_weights must be two finite numbers (c0, c1), got {self.arimerge_weights!r}."
            )
        self.arimerge_weights = (float(weights[0]), float(weights[1]))

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as a JSON-serialisable dict."""
        data = asdict(self)
        data["arimerge_weights"] = list(self.arimerge_weights)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaMergeXConfig:
        """Build a configuration from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdaMergeXError(f"AdaMergeXConfig: unknown keys {unknown}; expected a subset of {sorted(known)}.")
        kwargs = dict(data)
        if "arimerge_weights" in kwargs and kwargs["arimerge_weights"] is not None:
            kwargs["arimerge_weights"] = tuple(kwargs["arimerge_weights"])
        return cls(**kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adamergex_config.json`` into ``save_directory`` (created if needed), atomically."""
        from adamergex_peft.atomic import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        payload = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), payload)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> AdaMergeXConfig:
        """Read ``adamergex_config.json`` from a folder written by :meth:`save_pretrained` or ``adamergex merge``.

        A file written by ``adamergex merge`` also records inputs and provenance; only the ``config``
        entry is read from it.
        """
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if "config" in data and isinstance(data["config"], dict):
            data = data["config"]
        return cls.from_dict(data)


def _is_finite_real(value: Any) -> bool:
    """A finite real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise AdaMergeXError(f"AdaMergeXConfig.{name} must be one of {list(choices)}, got {value!r}.")
