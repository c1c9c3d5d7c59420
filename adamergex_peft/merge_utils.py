"""Pure tensor functions for AdaMergeX and its baselines.

Tensors in, tensors out: no model, no adapter names, no I/O (in the spirit of
``peft.utils.merge_utils``). Callers pass float32 tensors on the device they want the result on.

Notation (one module): LoRA adapter ``X`` has factors ``A_X`` (r_X x in), ``B_X`` (out x r_X) and
scaling ``s_X`` (``alpha / r`` or ``alpha / sqrt(r)`` under rsLoRA), so its weight update is
``dW_X = s_X B_X A_X``. An (IA)^3 adapter has a scaling vector ``l_X`` (initialised to ones).
``T`` is the source-language task adapter, ``Rs``/``Rg`` the source/target-language reference
adapters, ``t`` the scale of the language gap.

Errors are raised as :class:`~adamergex_peft.errors.AdaMergeXError` without adapter or module
names; the caller adds them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from adamergex_peft.errors import AdaMergeXError

#: An (IA)^3 denominator with an entry at or below this value is refused (zero or sign change).
IA3_MIN_DENOMINATOR = 1e-6


# --------------------------------------------------------------------------------------------- LoRA
def lora_stack(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    weights: Sequence[float],
    *,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Represent ``sum_i w_i * s_i * B_i @ A_i`` exactly as one LoRA factor pair with scaling 1.

    The factors are stacked, never multiplied out (no dense ``out x in`` matrix is formed)::

        A = [w_1 s_1 A_1 ; w_2 s_2 A_2 ; ...]      (sum_i r_i) x in
        B = [B_1, B_2, ...]                        out x (sum_i r_i)
        B @ A = sum_i w_i s_i B_i A_i

    For AdaMergeX, ``factors = [T, Rg, Rs]`` and ``weights = [1, t, -t]``. Each ``w_i s_i A_i`` is
    computed at float32 precision (or the inputs' own, if higher) and rounded once into the output.

    Args:
        factors: ``(A_i, B_i, s_i)`` per adapter; ``A_i`` is ``r_i x in``, ``B_i`` is ``out x r_i``.
        weights: the coefficient ``w_i`` of each adapter.
        rank: rank of the result (default ``sum_i r_i``); extra rank components are zero.
        dtype: dtype of the result (default: that of ``A_1``).

    Returns:
        ``(A, B)``, written directly into freshly allocated output tensors.
    """
    if len(factors) != len(weights) or not factors:
        raise ValueError("lora_stack needs one weight per factor pair and at least one pair")
    total = sum(a_i.shape[0] for a_i, _, _ in factors)
    rank = total if rank is None else rank
    if rank < total:
        raise ValueError(f"rank {rank} is smaller than the stacked rank {total}")
    a_first, b_first, _ = factors[0]
    dtype = dtype or a_first.dtype
    a = a_first.new_zeros((rank, a_first.shape[1]), dtype=dtype)
    b = b_first.new_zeros((b_first.shape[0], rank), dtype=dtype)
    offset = 0
    for (a_i, b_i, s), w in zip(factors, weights):
        r = a_i.shape[0]
        # bf16/fp16 tensor-scalar products are computed in float32 and rounded once
        torch.mul(a_i, float(w) * float(s), out=a[offset : offset + r])
        b[:, offset : offset + r].copy_(b_i)
        offset += r
    return a, b


def lora_svd(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` approximation (Frobenius norm) of ``B @ A``, without forming ``B @ A``.

    With thin QR decompositions ``B = Q_b R_b`` and ``A^T = Q_a R_a``, ``B A = Q_b (R_b R_a^T) Q_a^T``;
    the SVD ``R_b R_a^T = U S V^T`` of the small core gives ``B A = (Q_b U) S (Q_a V)^T``. Keeping the
    ``rank`` largest singular values, the result is split evenly::

        B' = Q_b U_k diag(sqrt(S_k))        A' = diag(sqrt(S_k)) V_k^T Q_a^T

    If ``rank`` exceeds the rank of ``B A`` the factors are padded with zeros, so the result has
    exactly ``rank`` rows/columns and equals ``B A`` up to rounding.

    Args:
        a: ``R x in`` factor.
        b: ``out x R`` factor.
        rank: rank of the result.

    Returns:
        ``(A', B', kept)`` where ``kept = sum(S_k^2) / sum(S^2)`` is the share of the update's squared
        Frobenius norm that the truncation keeps (1.0 for a zero update).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    q_b, r_b = torch.linalg.qr(b, mode="reduced")  # out x m, m x R
    q_a, r_a = torch.linalg.qr(a.T, mode="reduced")  # in x n, n x R
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # m x p, p, p x n
    k = min(rank, s.shape[0])
    total = float((s.double() ** 2).sum())
    kept = 1.0 if total == 0.0 else float((s[:k].double() ** 2).sum()) / total
    root = s[:k].sqrt()
    b_out = (q_b @ u[:, :k]) * root
    a_out = root[:, None] * (vh[:k] @ q_a.T)
    if k < rank:
        a_out = torch.cat([a_out, a_out.new_zeros(rank - k, a_out.shape[1])], dim=0)
        b_out = torch.cat([b_out, b_out.new_zeros(b_out.shape[0], rank - k)], dim=1)
    return a_out, b_out, kept


def linear_combination(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i x_i`` for tensors of one shape.

    Used for the official code's factor-wise LoRA merge (``A' = A_T + t (A_Rg - A_Rs)`` and the same
    for ``B``) and for additive (IA)^3 composition.
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("linear_combination needs one weight per tensor and at least one tensor")
    out = tensors[0] * float(weights[0])
    for x, w in zip(tensors[1:], weights[1:]):
        out = out + x * float(w)
    return out


def arimerge_lora(
    task: tuple[torch.Tensor, torch.Tensor],
    target_ref: tuple[torch.Tensor, torch.Tensor],
    source_ref: tuple[torch.Tensor, torch.Tensor],
    c0: float,
    c1: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AriMerge (Zhang et al., NeurIPS 2023) for LoRA: task + (target - source), composed factor-wise.

    Their LoRA negation flips ``B`` only, so with ``(A, B)`` pairs::

        A = c0 A_T + c1 (A_Rg + A_Rs)
        B = c0 B_T + c1 (B_Rg - B_Rs)

    Args:
        task, target_ref, source_ref: ``(A, B)`` of T, Rg and Rs (equal ranks).
        c0, c1: weights of the task and the language module.
    """
    a = c0 * task[0] + c1 * (target_ref[0] + source_ref[0])
    b = c0 * task[1] + c1 * (target_ref[1] - source_ref[1])
    return a, b


# ------------------------------------------------------------------------------------------ (IA)^3
def _check_denominator(denominator: torch.Tensor) -> None:
    bad = denominator <= IA3_MIN_DENOMINATOR
    if bool(bad.any()):
        index = int(bad.flatten().nonzero()[0])
        value = float(denominator.flatten()[index])
        raise AdaMergeXError(
            f"Rs: denominator l_Rs has {int(bad.sum())} entr{'y' if int(bad.sum()) == 1 else 'ies'} <= "
            f"{IA3_MIN_DENOMINATOR:g} (first: index {index}, value {value:.3g}); dividing by it would give inf/NaN "
            "or flip the sign of the scaling"
        )


def multiplicative_linear(
    task: torch.Tensor, target_ref: torch.Tensor, source_ref: torch.Tensor | None, t: float
) -> torch.Tensor:
    """The official code's (IA)^3 merge: ``l' = l_T * (t * (l_Rg / l_Rs - 1) + 1)``.

    At ``t = 1`` this is ``l_T * l_Rg / l_Rs``; at ``t = 0`` it is ``l_T``. ``source_ref=None`` means
    ``l_Rs = 1`` (no subtraction, the ``task_plus_target`` baseline).

    Raises:
        AdaMergeXError: an entry of ``l_Rs`` is zero, negative or near zero.
    """
    if source_ref is None:
        ratio = target_ref
    else:
        _check_denominator(source_ref)
        ratio = target_ref / source_ref
    return task * (t * (ratio - 1.0) + 1.0)


def multiplicative_power(
    task: torch.Tensor, target_ref: torch.Tensor, source_ref: torch.Tensor | None, t: float
) -> torch.Tensor:
    """The literal multiplicative analogy for (IA)^3: ``l' = l_T * (l_Rg / l_Rs) ** t``.

    ``source_ref=None`` means ``l_Rs = 1``.

    Raises:
        AdaMergeXError: ``l_Rs`` has an entry at or near zero, or ``l_Rg / l_Rs <= 0`` somewhere
            (a fractional power of a non-positive number is undefined).
    """
    if source_ref is None:
        ratio = target_ref
    else:
        _check_denominator(source_ref)
        ratio = target_ref / source_ref
    bad = ratio <= 0
    if bool(bad.any()):
        index = int(bad.flatten().nonzero()[0])
        raise AdaMergeXError(
            f"Rg/Rs: ratio l_Rg / l_Rs is <= 0 in {int(bad.sum())} entries (first: index {index}, value "
            f"{float(ratio.flatten()[index]):.3g}); its power t={t:g} is undefined. Use ia3_strategy='linear'"
        )
    return task * ratio.pow(t)


def arimerge_ia3(
    task: torch.Tensor, target_ref: torch.Tensor, source_ref: torch.Tensor, c0: float, c1: float
) -> torch.Tensor:
    """AriMerge for (IA)^3 (their negation is ``2 - l``): ``l = (1 - c0) + c0 l_T + c1 (l_Rg - l_Rs)``."""
    return (1.0 - c0) + c0 * task + c1 * (target_ref - source_ref)


def elementwise_multiplicative_factors(
    task: tuple[torch.Tensor, torch.Tensor],
    target_ref: tuple[torch.Tensor, torch.Tensor],
    source_ref: tuple[torch.Tensor, torch.Tensor],
    t: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's "cross" ablation for LoRA: (IA)^3's operators applied to LoRA factors.

    Element-wise, with the official code's linear form: ``A' = A_T * (t (A_Rg / A_Rs - 1) + 1)`` and
    the same for ``B``. Structure-blind on purpose (it shows why the operator must match the adapter).

    Raises:
        AdaMergeXError: a factor of ``Rs`` has an exact zero, or the result is not finite.
    """
    out = []
    for x_t, x_g, x_s in zip(task, target_ref, source_ref):
        if bool((x_s == 0).any()):
            raise AdaMergeXError(
                "a factor of the source reference adapter has exact zeros; element-wise division fails"
            )
        y = x_t * (t * (x_g / x_s - 1.0) + 1.0)
        out.append(y)
    return out[0], out[1]


def lora_scaling(lora_alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: ``alpha / sqrt(r)`` under rsLoRA, else ``alpha / r``."""
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank
