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
    rounding below float32), so the weight holds no NaN/Inf from this call.
    """
    left = left.to(device=weight.device, dtype=torch.float32)
    right = right.to(device=weight.device, dtype=torch.float32)
    cols = weight.shape[1]
    rows = max(1, min(weight.shape[0], _CHUNK_ELEMENTS // max(1, cols)))
    work = torch.empty((rows, cols), dtype=torch.float32, device=weight.device)
    stage = (
        work if weight.dtype == torch.float32 else torch.empty((rows, cols), dtype=weight.dtype, device=weight.device)
    )
    done = 0
    try:
        for start in range(0, weight.shape[0], rows):
            block = weight[start : start + rows]
            n = block.shape[0]
            if weight.dtype == torch.float32:
                torch.addmm(block, left[start : start + n], right, alpha=alpha, out=work[:n])
            else:
                work[:n].copy_(block)
                work[:n].addmm_(left[start : start + n], right, alpha=alpha)
                stage[:n].copy_(work[:n])
            if not _all_finite(stage[:n]):
                _add_rows_(weight[:done], left[:done], right, -alpha, work)
                return False
            block.copy_(stage[:n])
            done = start + n
    except BaseException:
        _add_rows_(weight[:done], left[:done], right, -alpha, work)
        raise
    return True


def _add_rows_(
    weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float, work: torch.Tensor
) -> None:
    """``weight += alpha * left @ right`` in row blocks of ``work`` (float32), without checks."""
    rows = work.shape[0]
    for start in range(0, weight.shape[0], rows):
        block = weight[start : start + rows]
        n = block.shape[0]
        work[:n].copy_(block)
        work[:n].addmm_(left[start : start + n], right, alpha=alpha)
        block.copy_(work[:n])


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

    def params(self) -> list[torch.nn.Parameter]:
        return [self.weight]

    def apply(self, sign: float) -> bool | None:
        return _add_low_rank_(self.weight.data, self.left, self.right, sign * self.scaling)


@dataclass
class _IA3Update:
    module: str
    weight: torch.nn.Parameter
    scale: torch.Tensor  # broadcastable to weight
    bias: torch.nn.Parameter | None
    bias_scale: torch.Tensor | None

    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def apply(self, sign: float) -> bool:
        """Multiply (sign > 0) or divide by the scale; False, changing nothing, if the result is not finite."""
        op = torch.mul if sign > 0 else torch.div
        results = []
        for param, scale in ((self.weight, self.scale), (self.bias, self.bias_scale)):
            if param is not None:
                data = param.data
                value = op(data.float(), scale.to(data.device)).to(data.dtype)
                if not _all_finite(value):
                    return False
                results.append((data, value))
        for data, value in results:
            data.copy_(value)
        return True


@dataclass
class _Touched:
    """One base parameter changed by a merge: what it was, and what it looked like right after."""

    module: str
    param: torch.nn.Parameter
    original: torch.Tensor | None  # a copy of the weights before the merge (None: undo by inverse update)
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

    def restore(self) -> None:
        self.param.data.copy_(self.original)


@dataclass
class BaseMergeHandle:
    """The result of :func:`merge_crosslingual_into_base`; :meth:`undo` takes the update out again.

    ``report`` is the engine's report (rank, modules, svd kept energy).
    """

    config: AdaMergeXConfig
    report: dict
    _entries: list = field(default_factory=list, repr=False)  # (update, [_Touched, ...]) per module
    merged: bool = True

    def undo(self) -> None:
        """Restore the base weights as they were before the merge.

        A module whose original weights were kept (bf16/fp16 weights by default, every weight with
        ``exact_undo=True``) gets them back bit for bit, however many merge/undo cycles. Otherwise
        (float32 by default, or ``exact_undo=False``) the update is subtracted (LoRA) or divided out
        ((IA)^3): about 1e-7 relative per cycle in float32 (one more rounding per cycle in bf16/fp16).

        Refuses, changing nothing, when the weights are no longer the ones merged into: converted
        (``model.half()``, ``.double()``, ``.to(dtype)``/device), replaced, or changed in place
        (``load_state_dict``, another merge on top; detected from a fingerprint of sampled entries
        taken after the merge). Calling it twice is an error.

        Raises:
            AdaMergeXError: already undone, or the weights changed since the merge.
        """
        if not self.merged:
            raise AdaMergeXError("this merge was already undone.")
        for _, items in self._entries:
            for touched in items:
                problem = touched.problem()
                if problem is not None:
                    raise AdaMergeXError(
                        f"cannot undo: module {touched.module!r}: {problem} since the merge (dtype/device "
                        "conversion, load_state_dict or another merge?); nothing was changed, reload the base "
                        "model instead."
                    )
        with torch.no_grad():
            for update, items in reversed(self._entries):
                _take_out(update, items)
        self._entries = []
        self.merged = False


def _take_out(update, items: list[_Touched]) -> None:
    if all(item.original is not None for item in items):
        for item in items:
            item.restore()
    else:
        update.apply(-1.0)


def _restore_copies(items: list[_Touched]) -> None:
    for item in items:
        if item.original is not None:
            item.restore()


def _keeps_copy(update, exact_undo: bool | None) -> bool:
    if exact_undo is not None:
        return exact_undo
    return update.weight.dtype not in (torch.float32, torch.float64)


def merge_crosslingual_into_base(
    model: PeftModel, config: AdaMergeXConfig, *, exact_undo: bool | None = None
) -> BaseMergeHandle:
    """Add the AdaMergeX update to the base weights of ``model`` in place (zero inference overhead).

    LoRA: ``W += s B A`` per module with the merged factors (for ``exact``, the stacked factors of
    all three adapters: one ``addmm`` per module, float32 accumulation, no dense update beyond one
    block of ``W``). (IA)^3: ``W *= l`` (and the bias of a non-feed-forward module), as PEFT's
    ``IA3Layer.merge`` does. No adapter is added and the adapters are not modified; they stay active,
    so evaluate the merged base with ``with model.disable_adapter(): ...`` or take it out with
    ``model.unload()``.

    Each module's result is checked in the weight's own dtype (a large ``t`` can overflow fp16 or
    bf16). A non-finite result, or any other failure (out of memory, Ctrl-C), restores every weight
    already changed before the error propagates: the failing module from its copy, bit for bit;
    modules already committed from their kept copies, bit for bit, or else by the inverse update
    (float32: up to rounding).

    Memory: with ``exact_undo`` (default: for weights below float32) a copy of each touched weight
    (and (IA)^3 bias) is taken before it is changed and kept until
    :meth:`BaseMergeHandle.undo`: 2 bytes per entry of every targeted bf16/fp16 weight, i.e. the
    targeted weights once more (about 13 GB for LoRA on all linear layers of a 7B bf16 model), on
    the weights' device. ``exact_undo=False`` keeps none (undo and a failure's rollback subtract or
    divide: drift per cycle; beyond the weights only one float32 row block, or for (IA)^3 one
    module's float32 result, is allocated); ``exact_undo=True`` keeps float32 copies too.

    Args:
        model: a ``PeftModel`` holding the adapters named in ``config``; no adapter may be merged
            by PEFT (``merge_adapter()``) at the time.
        config: which adapters, ``t``, method and strategies.
        exact_undo: keep the copies that make ``undo()`` bit-exact; ``None``: only below float32.

    Returns:
        A :class:`BaseMergeHandle`; ``handle.undo()`` restores the weights (e.g. to try another ``t``
        without reloading the model).

    Raises:
        AdaMergeXError: as :func:`merge_crosslingual`, an adapter merged by PEFT, or a non-finite
            result in the weight dtype (naming the module and dtype); nothing is modified.
    """
    _check_peft_model(model)
    _check_nothing_merged(model)
    result = _compute(model, config)
    updates = _plan_base_updates(model, result)
    handle = BaseMergeHandle(config=config, report=result.report)
    entries: list = []
    with torch.no_grad():
        try:
            for update in updates:
                keep = _keeps_copy(update, exact_undo)
                items = [_Touched(update.module, p, p.data.clone() if keep else None) for p in update.params()]
                try:
                    ok = update.apply(1.0)  # writes only finite values; takes itself out on failure
                except BaseException:
                    _restore_copies(items)
                    raise
                if ok is False:
                    _restore_copies(items)  # bit for bit over the subtraction
                    raise AdaMergeXError(
                        f"module {update.module!r}: the merged base weight would have NaN/Inf in "
                        f"{update.weight.dtype} (t={config.t:g} overflows it); use a smaller t or a wider dtype. "
                        "The base weights were restored."
                    )
                for item in items:
                    item.seal()
                entries.append((update, items))
        except BaseException:  # a non-finite result, out of memory half-way, Ctrl-C: restore, then re-raise
            for update, items in reversed(entries):
                _take_out(update, items)
            raise
    handle._entries = entries
    logger.info("merged %s (t=%g) into %d base weights", config.method, config.t, len(updates))
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
