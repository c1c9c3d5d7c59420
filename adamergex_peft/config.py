"""Configuration of an AdaMergeX merge (PEFT-style dataclass, no torch import)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from adamergex_peft import methods as _methods
from adamergex_peft.errors import AdaMergeXError
from adamergex_peft.methods import IA3_STRATEGIES, LORA_STRATEGIES, OPTION_DEFAULTS

CONFIG_NAME = "adamergex_config.json"
#: PEFT's adapter config file name (``peft.utils.CONFIG_NAME``), without importing peft.
ADAPTER_CONFIG_NAME = "adapter_config.json"

#: The config fields naming the three adapters, in the order (T, Rs, Rg) every API takes them.
ADAPTER_FIELDS: tuple[str, str, str] = ("task_adapter", "source_reference_adapter", "target_reference_adapter")
#: The names front ends (the sweep, the lm-eval model) give the three adapters inside a PeftModel.
DEFAULT_ADAPTER_NAMES: dict[str, str] = {
    "task_adapter": "task",
    "source_reference_adapter": "source_reference",
    "target_reference_adapter": "target_reference",
}


class _MethodNames(Sequence):
    """A live, read-only view of the registered method names (:data:`adamergex_peft.methods.METHODS`)."""

    def __getitem__(self, index):
        return tuple(_methods.METHODS)[index]

    def __len__(self) -> int:
        return len(_methods.METHODS)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_methods.METHODS))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in _methods.METHODS

    def __repr__(self) -> str:
        return repr(tuple(_methods.METHODS))


#: Names of the registered merge methods (derived from the registry in :mod:`adamergex_peft.methods`).
METHODS: Sequence[str] = _MethodNames()


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
    :func:`~adamergex_peft.merge_adapter_files` they are the adapter folders (folder arguments
    given to it replace them), and ``adamergex_config.json`` records the folders used.
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
        metadata={"help": "A registered merge method (adamergex_peft.methods.METHODS), e.g. 'adamergex'."},
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
        metadata={
            "help": (
                "Rank of the result for lora_strategy='svd'. Default: the task adapter's rank. A rank above the "
                "largest min(in, out) of the merged modules is capped to it (logged; larger would be zero padding)."
            )
        },
    )
    pad_rank: int | str | None = field(
        default=None,
        metadata={
            "help": (
                "LoRA only: zero-pad the result to this rank (exact: the same update), so that every module has one "
                "r and one lora_alpha and no rank/alpha patterns (what vLLM loads). 'vllm': the smallest rank vLLM "
                "accepts for --max-lora-rank (1, 8, 16, 32, ...) at or above the rank the merge needs. A rank below "
                "the needed one is an error (use lora_strategy='svd' with svd_rank to truncate instead)."
            )
        },
    )
    arimerge_weights: tuple[float, float] = field(
        default=OPTION_DEFAULTS["arimerge_weights"],
        metadata={"help": "(c0, c1): weights of the task and the language module for method='arimerge'."},
    )
    allow_different_base_models: bool = field(
        default=False,
        metadata={
            "help": "Merge adapters whose base_model_name_or_path differ (with a warning) instead of refusing them."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (and normalise numbers); the merge functions call it again.

        Raises:
            AdaMergeXError: with ``field`` set to the offending field.
        """
        for name in ADAPTER_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise AdaMergeXError(
                    f"AdaMergeXConfig.{name} must be a non-empty adapter name, got {value!r}.", field=name
                )
        if self.source_reference_adapter == self.target_reference_adapter:
            raise AdaMergeXError(
                "AdaMergeXConfig: source_reference_adapter and target_reference_adapter are the same adapter "
                f"({self.source_reference_adapter!r}); the language gap would be zero.",
                field="target_reference_adapter",
            )
        if self.task_adapter in (self.source_reference_adapter, self.target_reference_adapter):
            raise AdaMergeXError(
                f"AdaMergeXConfig: task_adapter {self.task_adapter!r} is also used as a reference adapter.",
                field="task_adapter",
            )
        if not is_finite_real(self.t):
            raise AdaMergeXError(f"AdaMergeXConfig.t must be a finite number, got {self.t!r}.", field="t")
        self.t = float(self.t)
        _methods.get_method(self.method)
        _check_choice("lora_strategy", self.lora_strategy, LORA_STRATEGIES)
        _check_choice("ia3_strategy", self.ia3_strategy, IA3_STRATEGIES)
        if self.svd_rank is not None:
            if isinstance(self.svd_rank, bool) or not isinstance(self.svd_rank, numbers.Integral) or self.svd_rank < 1:
                raise AdaMergeXError(
                    f"AdaMergeXConfig.svd_rank must be a positive int or None, got {self.svd_rank!r}.",
                    field="svd_rank",
                )
            self.svd_rank = int(self.svd_rank)
        if self.pad_rank is not None and self.pad_rank != "vllm":
            if isinstance(self.pad_rank, bool) or not isinstance(self.pad_rank, numbers.Integral) or self.pad_rank < 1:
                raise AdaMergeXError(
                    f"AdaMergeXConfig.pad_rank must be a positive int, 'vllm' or None, got {self.pad_rank!r}.",
                    field="pad_rank",
                )
            self.pad_rank = int(self.pad_rank)
        try:
            weights = tuple(self.arimerge_weights)
        except TypeError:
            weights = ()
        if len(weights) != 2 or not all(is_finite_real(w) for w in weights):
            raise AdaMergeXError(
                f"AdaMergeXConfig.arimerge_weights must be two finite numbers (c0, c1), got {self.arimerge_weights!r}.",
                field="arimerge_weights",
            )
        self.arimerge_weights = (float(weights[0]), float(weights[1]))
        if not isinstance(self.allow_different_base_models, bool):
            raise AdaMergeXError(
                "AdaMergeXConfig.allow_different_base_models must be True or False, got "
                f"{self.allow_different_base_models!r}.",
                field="allow_different_base_models",
            )

    def with_adapters(self, task_adapter: str, source_reference_adapter: str, target_reference_adapter: str):
        """The same settings for three other adapters (names in a PeftModel, or folders); validated again."""
        return dataclasses.replace(
            self,
            task_adapter=task_adapter,
            source_reference_adapter=source_reference_adapter,
            target_reference_adapter=target_reference_adapter,
        )

    @classmethod
    def for_default_adapters(cls, **settings: Any) -> AdaMergeXConfig:
        """A config naming the adapters :data:`DEFAULT_ADAPTER_NAMES` (what the sweep and lm-eval model load)."""
        return cls(**DEFAULT_ADAPTER_NAMES, **settings)

    @property
    def adapters(self) -> dict[str, str]:
        """``{field: adapter}`` for the three adapter fields, in :data:`ADAPTER_FIELDS` order."""
        return {name: getattr(self, name) for name in ADAPTER_FIELDS}

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


def is_finite_real(value: Any) -> bool:
    """A finite real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise AdaMergeXError(f"AdaMergeXConfig.{name} must be one of {list(choices)}, got {value!r}.", field=name)
