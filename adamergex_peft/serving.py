"""Serving readiness: does a LoRA adapter load in vLLM as is, and with which ``--max-lora-rank``?

Pure functions (no vLLM, no model). vLLM's LoRA loader (``vllm.lora.peft_helper.PEFTHelper``,
``vllm.config.LoRAConfig``) documents these rules, checked here on ``adapter_config.json`` (a
``LoraConfig`` or its dict) and, when given, the weights:

* LoRA only (vLLM, TGI and LoRAX serve no (IA)^3: export a full model instead);
* no DoRA (``use_dora``), no ``modules_to_save``, no trained biases (``bias``/``lora_bias``);
* one rank ``r`` and one ``lora_alpha`` for every module: vLLM applies one scaling per adapter,
  ``lora_alpha / r`` (``/ sqrt(r)`` under rsLoRA), and ignores ``rank_pattern``/``alpha_pattern``;
  so the patterns must be empty and every ``lora_A`` must have ``r`` rows;
* ``r <= --max-lora-rank``, which vLLM accepts only from :data:`VLLM_MAX_LORA_RANKS`
  (default 16; lm-eval's ``--model vllm`` passes ``max_lora_rank`` through, default 16 too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adamergex_peft.errors import AdaMergeXError

#: The values vLLM accepts for ``--max-lora-rank`` (``LoRAConfig.max_lora_rank``).
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def vllm_problems(peft_config: Any, state_dict: Mapping[str, Any] | None = None) -> list[str]:
    """Everything that keeps vLLM from loading the adapter as is (empty list: it loads).

    Args:
        peft_config: a ``LoraConfig`` (or any PEFT config) or the dict of ``adapter_config.json``.
        state_dict: the adapter's tensors in PEFT's saved format, to check that every ``lora_A``
            has ``r`` rows (anything with a ``.shape`` works).
    """
    peft_type = str(_get(peft_config, "peft_type", "")).upper().removeprefix("PEFTTYPE.")
    if peft_type != "LORA":
        return [f"peft_type {peft_type or '?'} is not LoRA; vLLM serves LoRA adapters only (export a full model)"]
    problems = []
    if _get(peft_config, "use_dora", False):
        problems.append("DoRA (use_dora=True) is not supported by vLLM")
    if _get(peft_config, "modules_to_save"):
        problems.append(f"modules_to_save={list(_get(peft_config, 'modules_to_save'))} is not supported by vLLM")
    if _get(peft_config, "bias", "none") != "none" or _get(peft_config, "lora_bias", False):
        problems.append("trained biases (bias != 'none' or lora_bias) are not supported by vLLM")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if _get(peft_config, pattern):
            problems.append(f"{pattern} is set; vLLM ignores it and would apply a wrong scaling")
    r = _get(peft_config, "r")
    if not isinstance(r, int) or r < 1:
        problems.append(f"r={r!r} is not a positive integer")
    elif r > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"r={r} exceeds vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")
    if state_dict is not None and isinstance(r, int):
        bad = sorted(
            key for key, tensor in state_dict.items() if key.endswith("lora_A.weight") and tuple(tensor.shape)[0] != r
        )
        if bad:
            problems.append(
                f"{len(bad)} modules have a rank other than r={r} (first: {bad[0]!r}, rank "
                f"{tuple(state_dict[bad[0]].shape)[0]}); vLLM needs one rank"
            )
    return problems


def vllm_max_lora_rank(peft_config: Any, state_dict: Mapping[str, Any] | None = None, *, name: str = "adapter") -> int:
    """The smallest ``--max-lora-rank`` with which vLLM serves this LoRA adapter.

    That is the smallest value of :data:`VLLM_MAX_LORA_RANKS` at or above ``r``.

    Raises:
        AdaMergeXError: the adapter does not load in vLLM as is (lists every reason).
    """
    problems = vllm_problems(peft_config, state_dict)
    if problems:
        raise AdaMergeXError(f"{name!r} is not vLLM-ready: {'; '.join(problems)}.")
    return vllm_padded_rank(_get(peft_config, "r"))


def vllm_padded_rank(rank: int) -> int:
    """The smallest vLLM ``--max-lora-rank`` value at or above ``rank`` (a good ``--pad-rank``)."""
    if rank < 1 or rank > VLLM_MAX_LORA_RANKS[-1]:
        raise AdaMergeXError(f"rank {rank} is outside vLLM's range 1..{VLLM_MAX_LORA_RANKS[-1]}.")
    return next(v for v in VLLM_MAX_LORA_RANKS if v >= rank)


def pad_lora_rank(a, b, rank: int):
    """Zero-pad LoRA factors to ``rank``: ``A`` (r x in) -> rank x in, ``B`` (out x r) -> out x rank.

    Exact: the padded rows of ``A`` and columns of ``B`` are zero, so ``B' A' = B A``. Keep the
    scaling unchanged by scaling ``lora_alpha`` with the rank (``alpha' = alpha * rank / r``, or
    ``alpha * sqrt(rank / r)`` under rsLoRA); the stacked merge output has scaling 1
    (``lora_alpha = r``), so there ``alpha' = rank``.

    Raises:
        AdaMergeXError: ``rank`` is below the factors' rank.
    """
    import torch

    r = a.shape[0]
    if b.shape[1] != r:
        raise AdaMergeXError(f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not factors of one update.")
    if rank < r:
        raise AdaMergeXError(
            f"cannot pad rank {r} down to {rank}; use lora_strategy='svd' with svd_rank={rank} "
            f"(--lora-strategy svd --svd-rank {rank}) to truncate instead."
        )
    if rank == r:
        return a, b
    return torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0), torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
