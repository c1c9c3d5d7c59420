"""AdaMergeX on a ``peft.PeftModel``: build a merged adapter in place, or merge into the base weights.

This is the plumbing between a ``PeftModel`` and the engine in :mod:`adamergex_peft.merge`: it reads
the three adapters' weights through PEFT's ``get_peft_model_state_dict`` (no copies), and registers
the result with PEFT's own ``add_adapter`` + ``set_peft_model_state_dict``, so the new adapter is an
ordinary LoRA/(IA)^3 adapter that ``save_pretrained`` writes in PEFT's format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from adamergex_peft.config import AdaMergeXConfig
from adamergex_peft.errors import AdaMergeXError
from adamergex_peft.merge import (
    IA3_SUFFIX,
    LORA_SUFFIXES,
    AdapterWeights,
    MergeResult,
    merge_state_dicts,
    module_target_name,
)
from adamergex_peft.merge_utils import lora_scaling

logger = logging.getLogger(__name__)

#: Size (in elements) of the float32 buffer used to add an update to a non-float32 weight in row blocks.
_CHUNK_ELEMENTS = 1 << 20

#: Entries sampled (evenly spaced) from each merged weight as its fingerprint for :meth:`BaseMergeHandle.undo`.
_FINGERPRINT_ENTRIES = 256

#: Names PEFT uses for its own sub-modules and parameters; an adapter with such a name confuses PEFT's lookups.
_PEFT_RESERVED_NAMES = frozenset(
    {
        "weight",
        "bias",
        "base_layer",
        "base_model",
        "model",
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_dropout",
        "lora_magnitude_vector",
        "ia3_l",
        "modules_to_save",
        "original_module",
    }
)


def _check_peft_model(model) -> None:
    if not isinstance(model, PeftModel):
        raise AdaMergeXError(
            f"expected a peft.PeftModel, got {type(model).__name__}; load the adapters with "
            "PeftModel.from_pretrained(base, task_dir, adapter_name=...) and model.load_adapter(dir, adapter_name=...)."
        )


def _compute(model: PeftModel, config: AdaMergeXConfig) -> MergeResult:
    """Validate the named adapters and run the engine on their (shared, uncopied) tensors."""
    _check_peft_model(model)
    config.validate()
    names = config.adapters
    for field_name, name in names.items():
        if name not in model.peft_config:
            raise AdaMergeXError(
                f"{field_name}={name!r} is not an adapter of this model; loaded adapters: {sorted(model.peft_config)}."
            )
    state_dict = model.state_dict()  # references to the parameters, not copies
    weights = [
        AdapterWeights(
            name,
            model.peft_config[name],
            get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=name),
        )
        for name in names.values()
    ]
    return merge_state_dicts(*weights, config)


def _check_name_collision(model: PeftModel, adapter_name: str) -> None:
    """Refuse an adapter name that is also a module or parameter name component (PEFT matches names by parts)."""
    parts = set(_PEFT_RESERVED_NAMES)
    for name, _ in model.named_parameters():
        parts.update(name.split("."))
    for name, _ in model.named_modules():
        parts.update(name.split("."))
    if adapter_name in parts:
        raise AdaMergeXError(
            f"adapter_name {adapter_name!r} is also a module or parameter name in this model (PEFT finds adapters "
            "by name parts); choose another name."
        )


def merge_crosslingual(model: PeftModel, config: AdaMergeXConfig, adapter_name: str) -> str:
    """Add a new adapter ``adapter_name`` to ``model``: the AdaMergeX merge of three of its adapters.

    For LoRA the new adapter's update is ``dW_T + t (dW_Rg - dW_Rs)`` (``method="adamergex"``,
    ``lora_strategy="exact"``: stacked factors of rank ``r_T + r_Rg + r_Rs``, no dense matrix);
    for (IA)^3 it is ``l_T * (t (l_Rg / l_Rs - 1) + 1)`` (``ia3_strategy="linear"``). See
    :func:`adamergex_peft.merge.merge_state_dicts` for every method and strategy.

    Like PEFT's ``add_weighted_adapter``, the new adapter is not activated (call
    ``model.set_adapter(adapter_name)``), the source adapters and base weights are not modified,
    and the new adapter's parameters are frozen. Its tensors are on the task adapter's device and
    in its dtype (computed in float32). ``model.save_pretrained(dir, selected_adapters=[name])``
    writes an ordinary PEFT adapter that loads without this library.

    Args:
        model: a ``PeftModel`` holding the adapters named in ``config``.
        config: which adapters, ``t``, method and strategies.
        adapter_name: name of the new adapter; must not exist yet.

    Returns:
        ``adapter_name``.

    Raises:
        AdaMergeXError: unknown or incompatible adapters, bad values, an existing ``adapter_name``.
            The model is left exactly as it was.
    """
    _check_peft_model(model)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise AdaMergeXError(
            f"adapter_name must be a non-empty string without '.' (PEFT uses it in module paths), got {adapter_name!r}."
        )
    if adapter_name in model.peft_config:
        raise AdaMergeXError(
            f"an adapter named {adapter_name!r} already exists; choose another name or delete it first "
            f"(model.delete_adapter({adapter_name!r}))."
        )
    _check_name_collision(model, adapter_name)
    result = _compute(model, config)
    active_before = list(model.active_adapters)
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    try:
        model.add_adapter(adapter_name, result.peft_config, low_cpu_mem_usage=True)
        load = set_peft_model_state_dict(model, result.state_dict, adapter_name=adapter_name, low_cpu_mem_usage=True)
        missing = [k for k in load.missing_keys if f".{adapter_name}." in k or k.endswith(f".{adapter_name}")]
        if load.unexpected_keys or missing:
            raise AdaMergeXError(
                f"PEFT did not accept the merged weights for {adapter_name!r}: "
                f"unexpected {load.unexpected_keys[:3]}, missing {missing[:3]}."
            )
    except Exception:
        if adapter_name in model.peft_config:
            model.delete_adapter(adapter_name)
        if list(model.active_adapters) != active_before:
            model.set_adapter(active_before if len(active_before) > 1 else active_before[0])
        for param, flag in requires_grad.items():  # PEFT's add/delete/set_adapter toggle requires_grad
            param.requires_grad_(flag)
        raise
    # PEFT moves a loaded adapter to the base layer's device *and dtype*; keep the task adapter's dtype.
    dtype = next(iter(result.state_dict.values())).dtype
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
            param.data = param.data.to(dtype)
            param.requires_grad_(False)
    logger.info(
        "added adapter %r: %s of %r, %r and %r (t=%g), %s",
        adapter_name,
        config.method,
        config.task_adapter,
        config.target_reference_adapter,
        config.source_reference_adapter,
        config.t,
        result.report,
    )
    return adapter_name


# ------------------------------------------------------------------------------ merge into the base
def _add_low_rank_(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> bool:
    """``weight += alpha * left @ right`` in place, accumulating in float32; False if it does not fit the dtype.

    The weight is updated in row blocks through one reused float32 buffer of at most
    ``_CHUNK_ELEMENTS`` elements (a single rounding per weight entry); each block is checked in the
    weight's dtype *before* it is written. On a non-finite block (returns False) or an exception,
    the blocks already written are taken out again (subtracting: float32 round-off, or one more
    rounding below float32), so the weight holds no NaN/Inf from this call. Used by the export
    writer; :func:`merge_crosslingual_into_base` uses :func:`_merge_rows` (same arithmetic).
    """
    return _merge_rows(weight, _LowRank(left, right, alpha), exact=False) is not None


class _LowRank:
    """Row-block operator ``W -> W + alpha * left @ right`` (float32 accumulation) and its inverse."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, alpha: float):
        self.left, self.right, self.alpha = left, right, alpha

    def bind(self, weight: torch.Tensor) -> None:
        self.left = self.left.to(device=weight.device, dtype=torch.float32)
        self.right = self.right.to(device=weight.device, dtype=torch.float32)

    def _add(self, block: torch.Tensor, start: int, out: torch.Tensor, alpha: float) -> None:
        left = self.left[start : start + block.shape[0]]
        if block.dtype == torch.float32:
            torch.addmm(block, left, self.right, alpha=alpha, out=out)
        else:
            out.copy_(block)
            out.addmm_(left, self.right, alpha=alpha)

    def forward(self, block: torch.Tensor, start: int, out: torch.Tensor) -> None:
        self._add(block, start, out, self.alpha)

    def inverse(self, block: torch.Tensor, start: int, out: torch.Tensor) -> None:
        self._add(block, start, out, -self.alpha)


class _Scale:
    """Row-block operator ``W -> W * scale`` (float32, ``scale`` broadcast to ``W``) and its inverse ``W / scale``."""

    def __init__(self, scale: torch.Tensor):
        self.scale = scale

    def bind(self, weight: torch.Tensor) -> None:
        scale = self.scale.to(device=weight.device, dtype=torch.float32)
        self.full = _rows_view(scale.expand(weight.shape), weight.shape)  # a view, no copy for 1-D/2-D

    def _rows(self, start: int, n: int) -> torch.Tensor:
        return self.full[start : start + n]

    def forward(self, block: torch.Tensor, start: int, out: torch.Tensor) -> None:
        torch.mul(block, self._rows(start, block.shape[0]), out=out)

    def inverse(self, block: torch.Tensor, start: int, out: torch.Tensor) -> None:
        torch.div(block, self._rows(start, block.shape[0]), out=out)


def _rows_view(tensor: torch.Tensor, shape) -> torch.Tensor:
    """``tensor`` (of ``shape``) as rows: 2-D as is, 1-D as a column, N-D as ``(shape[0], -1)``."""
    if len(shape) == 2:
        return tensor
    if len(shape) == 1:
        return tensor.unsqueeze(1)
    return tensor.reshape(shape[0], -1)


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class _FixUp:
    """What exact undo needs for one weight, per row block of ``rows`` rows.

    A block's entry is ``None`` (the inverse update restores every entry bit for bit), ``(index,
    values)`` (flat positions in the block, int32, and the original values of the entries that the
    inverse update does not restore), or a dense copy of the original block (when that is smaller).
    """

    rows: int
    blocks: list = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        total = 0
        for piece in self.blocks:
            for t in piece if isinstance(piece, tuple) else (piece,) if piece is not None else ():
                total += t.numel() * t.element_size()
        return total


def _block_rows(shape) -> int:
    cols = 1
    for size in shape[1:]:
        cols *= size
    return max(1, min(shape[0] if shape else 1, _CHUNK_ELEMENTS // max(1, cols)))


def _merge_rows(weight: torch.Tensor, op, *, exact: bool) -> _FixUp | None | bool:
    """Apply ``op`` to ``weight`` in place, in row blocks of at most ``_CHUNK_ELEMENTS`` float32 entries.

    Each block is computed in float32, rounded once to the weight's dtype and checked for NaN/Inf
    *before* it is written. With ``exact``, each block's undo is rehearsed right away with the very
    arithmetic :func:`_unmerge_rows` will use (``inverse`` of the rounded result, rounded again) and the
    entries whose bits it would not restore are recorded (:class:`_FixUp`). Returns the fix-up
    (``exact``), True (not ``exact``), or None for a non-finite block, after taking out the blocks
    already written (exactly with ``exact``, else by the inverse update); so does an exception.
    """
    op.bind(weight)
    data = _rows_view(weight, weight.shape)
    rows = _block_rows(weight.shape)
    cols = data.shape[1]
    f32 = weight.dtype == torch.float32
    work = torch.empty((rows, cols), dtype=torch.float32, device=weight.device)
    stage = work if f32 else torch.empty((rows, cols), dtype=weight.dtype, device=weight.device)
    fix = _FixUp(rows) if exact else None
    if exact:  # the rehearsed undo: float32 (its own buffer for a float32 weight), then the weight dtype
        back = torch.empty_like(work) if f32 else work
        undone = back if f32 else torch.empty_like(stage)
        mask = torch.empty((rows, cols), dtype=torch.bool, device=weight.device)
        as_int = _INT_OF_SIZE[weight.element_size()]
    done = 0
    try:
        for start in range(0, data.shape[0], rows):
            block = data[start : start + rows]
            n = block.shape[0]
            op.forward(block, start, work[:n])
            if not f32:
                stage[:n].copy_(work[:n])
            if not _all_finite(stage[:n]):
                _unmerge_rows(data, op, fix, done)
                return None
            if exact:
                op.inverse(stage[:n], start, back[:n])
                if not f32:
                    undone[:n].copy_(back[:n])
                torch.ne(undone[:n].view(as_int), block.view(as_int), out=mask[:n])  # bits, not values (-0.0, NaN)
                fix.blocks.append(_fix_piece(mask[:n], block))
            block.copy_(stage[:n])
            done = start + n
    except BaseException:
        _unmerge_rows(data, op, fix, done)
        raise
    return fix if exact else True


def _fix_piece(mask: torch.Tensor, block: torch.Tensor):
    """The stored fix-up of one block: nothing, (int32 positions, original values), or a dense copy."""
    index = _flat_nonzero(mask.reshape(-1))
    count = index.numel()
    if count == 0:
        return None
    size = block.element_size()
    if count * (4 + size) >= block.numel() * size or block.numel() >= 2**31:
        return block.clone()
    return index.to(torch.int32), block.reshape(-1)[index]


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """``mask.nonzero()`` of a contiguous 1-D bool tensor, in order, scanning 8 entries per int64 word.

    ``nonzero`` costs about one pass per entry scanned; the words that hold a True are few when the
    mismatches are, so only they are scanned entry by entry.
    """
    n = mask.numel()
    whole = n - n % 8
    words = mask[:whole].view(torch.int64)  # 8 bools per word
    hit = words.nonzero().reshape(-1)
    inner = words[hit].view(torch.bool).reshape(-1, 8).nonzero()  # (word, entry) pairs, row-major order
    index = hit[inner[:, 0]] * 8 + inner[:, 1]
    if whole < n:
        index = torch.cat([index, mask[whole:].nonzero().reshape(-1) + whole])
    return index


def _unmerge_rows(data: torch.Tensor, op, fix: _FixUp | None, end: int) -> None:
    """Take ``op`` out of rows ``[0, end)`` of ``data`` (2-D rows view): exactly with ``fix``, else by the inverse."""
    if end <= 0:
        return
    rows = fix.rows if fix is not None else _block_rows(data.shape)
    cols = data.shape[1]
    f32 = data.dtype == torch.float32
    work = torch.empty((min(rows, end), cols), dtype=torch.float32, device=data.device)
    stage = work if f32 else torch.empty(work.shape, dtype=data.dtype, device=data.device)
    for i, start in enumerate(range(0, end, rows)):
        block = data[start : min(start + rows, end)]
        n = block.shape[0]
        piece = fix.blocks[i] if fix is not None else None
        if isinstance(piece, torch.Tensor):  # a dense copy
            block.copy_(piece)
            continue
        op.inverse(block, start, work[:n])
        if not f32:
            stage[:n].copy_(work[:n])
        if piece is not None:
            index, values = piece
            stage[:n].view(-1).index_put_((index,), values)
        block.copy_(stage[:n])


def _all_finite(tensor: torch.Tensor) -> bool:
    """Exact, no temporary: a finite sum proves it; else min and max (NaN propagates, an Inf is one of them)."""
    if tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum())):  # any NaN/Inf makes the sum NaN/Inf; cheaper than aminmax
        return True
    low, high = torch.aminmax(tensor)  # the sum may also overflow: decide exactly
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``_FINGERPRINT_ENTRIES`` evenly spaced entries (and the last one) of ``tensor``."""
    flat = tensor.reshape(-1)
    step = max(1, flat.numel() // _FINGERPRINT_ENTRIES)
    return torch.cat([flat[::step], flat[-1:]]).clone()


@dataclass
class _LoraUpdate:
    module: str
    weight: torch.nn.Parameter
    left: torch.Tensor
    right: torch.Tensor
    scaling: float

    def parts(self) -> list:
        return [(self.weight, _LowRank(self.left, self.right, self.scaling))]


@dataclass
class _IA3Update:
    module: str
    weight: torch.nn.Parameter
    scale: torch.Tensor  # broadcastable to weight
    bias: torch.nn.Parameter | None
    bias_scale: torch.Tensor | None

    def parts(self) -> list:
        parts = [(self.weight, _Scale(self.scale))]
        if self.bias is not None:
            parts.append((self.bias, _Scale(self.bias_scale)))
        return parts


@dataclass
class _Touched:
    """One base parameter changed by a merge: how to take the update out, and what it looked like right after."""

    module: str
    param: torch.nn.Parameter
    op: object
    fix: _FixUp | None = None  # exact undo's fix-up (None: undo by the inverse update alone)
    data_ptr: int = 0
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    shape: tuple = ()
    fingerprint: torch.Tensor | None = None

    def seal(self) -> None:
        """Record the identity and a fingerprint of the merged weights (checked by undo)."""
        data = self.param.data
        self.data_ptr, self.dtype, self.device, self.shape = (
            data.data_ptr(),
            data.dtype,
            data.device,
            tuple(data.shape),
        )
        self.fingerprint = _fingerprint(data)

    def problem(self) -> str | None:
        """Why these are no longer the weights that were merged into, or None."""
        data = self.param.data
        if data.dtype != self.dtype or data.device != self.device or tuple(data.shape) != self.shape:
            return f"now {data.dtype} {tuple(data.shape)} on {data.device}, merged as {self.dtype} {self.shape} on {self.device}"
        if data.data_ptr() != self.data_ptr:
            return "the weight tensor was replaced"
        if not torch.equal(_fingerprint(data), self.fingerprint):
            return "the weight values were changed"
        return None

    def take_out(self) -> None:
        rows = _rows_view(self.param.data, self.param.data.shape)
        _unmerge_rows(rows, self.op, self.fix, rows.shape[0])

    @property
    def undo_bytes(self) -> int:
        return self.fix.nbytes if self.fix is not None else 0


@dataclass
class BaseMergeHandle:
    """The result of :func:`merge_crosslingual_into_base`; :meth:`undo` takes the update out again.

    ``report`` is the engine's report (rank, modules, svd kept energy). ``undo_bytes`` is the memory
    kept for an exact undo, ``weight_bytes`` that of the weights merged into (what full copies
    would take).
    """

    config: AdaMergeXConfig
    report: dict
    _entries: list = field(default_factory=list, repr=False)  # [_Touched, ...] per module
    merged: bool = True
    exact_undo: bool = True
    _matmul_precision: str = "highest"

    @property
    def undo_bytes(self) -> int:
        return sum(item.undo_bytes for items in self._entries for item in items)

    @property
    def weight_bytes(self) -> int:
        return sum(item.param.data.nbytes for items in self._entries for item in items)

    def undo(self) -> None:
        """Restore the base weights as they were before the merge.

        With ``exact_undo`` (the default) every weight gets its original bits back, however many
        merge/undo cycles: the inverse update (the same float32 arithmetic, block by block) plus
        the stored originals of the entries it does not restore (see
        :func:`merge_crosslingual_into_base`). With ``exact_undo=False`` the update is only
        subtracted (LoRA) or divided out ((IA)^3): one rounding per cycle (about 1e-7 relative in
        float32, 2^-9 in bf16 for the entries it hits).

        Refuses, changing nothing, when the weights are no longer the ones merged into: converted
        (``model.half()``, ``.double()``, ``.to(dtype)``/device), replaced, or changed in place
        (``load_state_dict``, another merge on top; detected from a fingerprint of sampled entries
        taken after the merge). Calling it twice is an error.

        Raises:
            AdaMergeXError: already undone, or the weights changed since the merge.
        """
        if not self.merged:
            raise AdaMergeXError("this merge was already undone.")
        for items in self._entries:
            for touched in items:
                problem = touched.problem()
                if problem is not None:
                    raise AdaMergeXError(
                        f"cannot undo: module {touched.module!r}: {problem} since the merge (dtype/device "
                        "conversion, load_state_dict or another merge?); nothing was changed, reload the base "
                        "model instead."
                    )
        with torch.no_grad(), _matmul_precision(self._matmul_precision):
            for items in reversed(self._entries):
                for touched in reversed(items):
                    touched.take_out()
        self._entries = []
        self.merged = False


class _matmul_precision:  # noqa: N801 - a context manager used like a function
    """Run with ``torch.set_float32_matmul_precision(value)`` (the merge's), restoring the caller's after.

    Exact undo repeats the merge's float32 ``addmm``; a TF32/bf16 matmul setting changed in between
    would change its rounding.
    """

    def __init__(self, value: str):
        self.value = value
        self.before = None

    def __enter__(self):
        self.before = torch.get_float32_matmul_precision()
        if self.before != self.value:
            torch.set_float32_matmul_precision(self.value)

    def __exit__(self, *exc):
        if self.before != self.value:
            torch.set_float32_matmul_precision(self.before)
        return False


def merge_crosslingual_into_base(
    model: PeftModel, config: AdaMergeXConfig, *, exact_undo: bool | None = True
) -> BaseMergeHandle:
    """Add the AdaMergeX update to the base weights of ``model`` in place (zero inference overhead).

    LoRA: ``W += s B A`` per module with the merged factors (for ``exact``, the stacked factors of
    all three adapters: float32 accumulation, no dense update beyond one block of ``W``).
    (IA)^3: ``W *= l`` (and the bias of a non-feed-forward module), as PEFT's ``IA3Layer.merge``
    does. Each weight is processed in row blocks of at most 2^20 entries, computed in float32 and
    rounded once to the weight's dtype. No adapter is added and the adapters are not modified; they
    stay active, so evaluate the merged base with ``with model.disable_adapter(): ...`` or take it
    out with ``model.unload()``.

    Exact undo (``exact_undo=True``, the default, every dtype): while merging a block, its undo is
    rehearsed with the same arithmetic undo will use, ``round(round(W + dW) - dW)`` (``W * l / l``
    for (IA)^3), and only the entries where that differs from ``W`` in any bit are kept: their
    int32 position in the block and original value, 6 bytes per kept bf16/fp16 entry (8 for
    float32), or a copy of the block when that is smaller (a kept share above 1/3 in bf16/fp16,
    1/2 in float32). ``handle.undo()`` then repeats the inverse and puts those originals back: the
    base is bit-identical after any number of merge/undo cycles. The kept share grows with the
    update's size relative to the weights (measured on random N(0, 0.02) weights, rank-24 updates):
    0.14-1.3% of the entries (bf16/fp16) and 0.4-2.3% (float32) for updates of 1e-3 to 1e-2 of
    ``|W|``, i.e. 0.5-5% of a full copy; ~19% of a copy for updates of 7.5e-2 of ``|W|``; ~3% of the
    entries (9% of a copy) for (IA)^3 vectors ``1 + 0.05 N(0, 1)``. ``handle.undo_bytes`` says what
    was kept. The rehearsal costs time: on one CPU thread a merge takes about 1.3-3x as long as
    without it. ``exact_undo=False`` keeps nothing and rehearses nothing: undo (and a failure's
    rollback) subtracts or divides, one rounding per cycle (drift).

    Each block's result is checked in the weight's own dtype before it is written (a large ``t``
    can overflow fp16 or bf16). A non-finite result, or any other failure (out of memory, Ctrl-C),
    takes out every block already written before the error propagates, bit for bit with
    ``exact_undo`` (else by the inverse update).

    Memory beyond the fix-up: per weight, buffers of one row block (2^20 entries): a float32 one
    (4 MiB) and one in the weight dtype; with ``exact_undo`` one more of each (a float32 weight:
    one more float32 buffer) and a 1 MiB bool mask, plus the block's positions while they are
    located (int64, 8 bytes per kept entry).

    Args:
        model: a ``PeftModel`` holding the adapters named in ``config``; no adapter may be merged
            by PEFT (``merge_adapter()``) at the time.
        config: which adapters, ``t``, method and strategies.
        exact_undo: keep what makes ``undo()`` bit-exact (default; ``None`` means the same); False
            keeps nothing.

    Returns:
        A :class:`BaseMergeHandle`; ``handle.undo()`` restores the weights (e.g. to try another ``t``
        without reloading the model).

    Raises:
        AdaMergeXError: as :func:`merge_crosslingual`, an adapter merged by PEFT, or a non-finite
            result in the weight dtype (naming the module and dtype); nothing is modified.
    """
    _check_peft_model(model)
    if exact_undo is None:  # the former "default" spelling
        exact_undo = True
    if not isinstance(exact_undo, bool):
        raise AdaMergeXError(f"exact_undo must be True or False, got {exact_undo!r}.")
    _check_nothing_merged(model)
    result = _compute(model, config)
    updates = _plan_base_updates(model, result)
    handle = BaseMergeHandle(
        config=config,
        report=result.report,
        exact_undo=exact_undo,
        _matmul_precision=torch.get_float32_matmul_precision(),
    )
    entries: list = []
    with torch.no_grad():
        try:
            for update in updates:
                items: list = []
                try:
                    for param, op in update.parts():
                        fix = _merge_rows(param.data, op, exact=exact_undo)  # takes itself out on failure
                        if fix is None:
                            raise AdaMergeXError(
                                f"module {update.module!r}: the merged base weight would have NaN/Inf in "
                                f"{update.weight.dtype} (t={config.t:g} overflows it); use a smaller t or a wider "
                                "dtype. The base weights were restored."
                            )
                        items.append(_Touched(update.module, param, op, fix if exact_undo else None))
                except BaseException:
                    for touched in reversed(items):  # e.g. the (IA)^3 weight when its bias fails
                        touched.take_out()
                    raise
                for touched in items:
                    touched.seal()
                entries.append(items)
        except BaseException:  # a non-finite result, out of memory half-way, Ctrl-C: restore, then re-raise
            for items in reversed(entries):
                for touched in reversed(items):
                    touched.take_out()
            raise
    handle._entries = entries
    logger.info(
        "merged %s (t=%g) into %d base weights; kept %.1f MiB for exact undo (%.2f%% of the weights)",
        config.method,
        config.t,
        len(updates),
        handle.undo_bytes / 2**20,
        100.0 * handle.undo_bytes / max(1, handle.weight_bytes),
    )
    return handle


def _check_nothing_merged(model: PeftModel) -> None:
    """Refuse while PEFT has an adapter merged into the base weights (the update would count twice)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged: set[str] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            merged.update(getattr(module, "merged_adapters", []) or [])
    if merged:
        raise AdaMergeXError(
            f"adapter(s) {sorted(merged)} are merged into the base weights by PEFT (merge_adapter()); call "
            "model.unmerge_adapter() first, or the task update would count twice."
        )


def _plan_base_updates(model: PeftModel, result: MergeResult) -> list:
    """Resolve every merged module to its base weight and check it, before anything is modified."""
    cfg = result.peft_config
    updates: list = []
    if cfg.peft_type.value == "LORA":
        scaling = lora_scaling(cfg.lora_alpha, cfg.r, cfg.use_rslora)
        modules = sorted({k[: -len(s)] for k in result.state_dict for s in LORA_SUFFIXES if k.endswith(s)})
        for module in modules:
            layer = _layer(model, module, LoraLayer)
            weight = _base_weight(layer, module)
            a = result.state_dict[module + LORA_SUFFIXES[0]]
            b = result.state_dict[module + LORA_SUFFIXES[1]]
            left, right = (a.T, b.T) if getattr(layer, "fan_in_fan_out", False) else (b, a)
            if tuple(weight.shape) != (left.shape[0], right.shape[1]):
                raise AdaMergeXError(
                    f"module {module_target_name(module)!r}: merged update does not fit the base weight "
                    f"{tuple(weight.shape)}."
                )
            updates.append(_LoraUpdate(module_target_name(module), weight, left, right, scaling))
    else:
        for key, vec in result.state_dict.items():
            module = key[: -len(IA3_SUFFIX)]
            layer = _layer(model, module, IA3Layer)
            weight = _base_weight(layer, module)
            vec = vec.to(device=weight.device, dtype=torch.float32)
            if bool((vec == 0).any()):
                raise AdaMergeXError(
                    f"module {module_target_name(module)!r}: the merged (IA)^3 vector has zeros; merging it into the "
                    "base could not be undone."
                )
            scale = vec.T if getattr(layer, "fan_in_fan_out", False) else vec
            base = layer.get_base_layer()
            bias = base.bias if (not layer.is_feedforward and getattr(base, "bias", None) is not None) else None
            updates.append(
                _IA3Update(
                    module_target_name(module),
                    weight,
                    scale,
                    bias,
                    vec.reshape(bias.shape) if bias is not None else None,
                )
            )
    return updates


def _layer(model: PeftModel, module: str, kind: type):
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        layer = None
    if not isinstance(layer, kind):
        raise AdaMergeXError(f"module {module_target_name(module)!r}: no {kind.__name__} at this path in the model.")
    return layer


def _base_weight(layer, module: str) -> torch.nn.Parameter:
    weight = getattr(layer.get_base_layer(), "weight", None)
    if weight is None or not weight.is_floating_point():
        raise AdaMergeXError(
            f"module {module_target_name(module)!r}: the base weight is not a floating-point tensor "
            "(quantized?); merge into an unquantized model."
        )
    return weight
