"""The merge engine: three PEFT adapter state dicts in, one PEFT adapter state dict out.

Both front ends use it: :mod:`adamergex_peft.model` (adapters inside a ``PeftModel``) and
:mod:`adamergex_peft.files` (adapter folders, no base model). Inputs are PEFT's saved format (keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` / ``.ia3_l``, no adapter name), so
the output can be saved with ``safetensors`` or loaded with ``set_peft_model_state_dict``.

The per-module math lives in :mod:`adamergex_peft.merge_utils`; this module validates the inputs,
walks the modules, applies the method registered in :mod:`adamergex_peft.methods` (its formula
for the strategy) and builds the output config.
Everything is validated and computed before anything is returned, so a caller that registers or
writes the result only afterwards never leaves partial state behind.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import IA3Config, LoraConfig, PeftConfig, PeftType
from peft.utils.other import get_pattern_key

from adamergex_peft import merge_utils as mu
from adamergex_peft.config import AdaMergeXConfig, is_finite_real
from adamergex_peft.errors import AdaMergeXError
from adamergex_peft.methods import OPTION_DEFAULTS, OPTION_PEFT_TYPES, MergeMethod, get_method

logger = logging.getLogger(__name__)

PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
IA3_SUFFIX = ".ia3_l"
# Initialisations that rewrite the base weights: such adapters only make sense with that base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda")


@dataclass
class AdapterWeights:
    """One adapter as PEFT saves it.

    Args:
        name: how messages refer to it (adapter name or folder path).
        peft_config: its ``LoraConfig`` or ``IA3Config``.
        state_dict: tensors keyed as in ``adapter_model.safetensors`` (see module docstring).
        sha256: hex digest of the weights file it was read from, if any (for provenance records).
    """

    name: str
    peft_config: PeftConfig
    state_dict: dict[str, torch.Tensor]
    sha256: str | None = None


@dataclass
class MergeResult:
    """A merged adapter: an ordinary ``LoraConfig``/``IA3Config`` and its weights in PEFT's saved format.

    ``report`` holds diagnostics: ``{"rank": ..., "modules": n, "svd_kept_energy": {module: share}}``.
    """

    peft_config: PeftConfig
    state_dict: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- input parsing
@dataclass
class _LoraModule:
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def module_target_name(module: str) -> str:
    """``base_model.model.model.layers.0.q_proj`` -> ``model.layers.0.q_proj`` (the name PEFT matches)."""
    return module[len(PREFIX) :] if module.startswith(PREFIX) else module


def _check_config(adapter: AdapterWeights) -> None:
    cfg = adapter.peft_config
    if cfg.peft_type not in (PeftType.LORA, PeftType.IA3):
        raise AdaMergeXError(
            f"adapter {adapter.name!r} is a {cfg.peft_type} adapter; AdaMergeX merges LORA and IA3 adapters only."
        )
    if getattr(cfg, "modules_to_save", None):
        raise AdaMergeXError(
            f"adapter {adapter.name!r} has modules_to_save={sorted(cfg.modules_to_save)}: fully trained modules "
            "have no language-gap arithmetic; retrain without them."
        )
    if cfg.peft_type == PeftType.LORA:
        if cfg.use_dora:
            raise AdaMergeXError(
                f"adapter {adapter.name!r} is a DoRA adapter (use_dora=True): its magnitude vector is not additive, "
                "so the LoRA merge formulas do not apply."
            )
        if getattr(cfg, "target_parameters", None):
            raise AdaMergeXError(f"adapter {adapter.name!r} targets parameters (target_parameters); not supported.")
        if getattr(cfg, "lora_bias", False):
            raise AdaMergeXError(f"adapter {adapter.name!r} trains a LoRA bias (lora_bias=True); not supported.")
        if cfg.bias != "none":
            raise AdaMergeXError(
                f"adapter {adapter.name!r} trains base biases (bias={cfg.bias!r}); only bias='none' is supported."
            )
        init = cfg.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            raise AdaMergeXError(
                f"adapter {adapter.name!r} was initialised with {init!r}, which rewrites the base weights; save it "
                "converted to a plain LoRA (path_initial_model_for_weight_conversion) before merging."
            )


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _all_finite(tensor: torch.Tensor) -> bool:
    """Exact and cheap: ``amax`` propagates NaN, and an infinite entry makes the maximum infinite."""
    return tensor.numel() == 0 or bool(torch.isfinite(tensor.abs().amax()))


def _check_finite(adapter: AdapterWeights, key: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise AdaMergeXError(f"adapter {adapter.name!r}, tensor {key!r}: dtype {tensor.dtype} is not floating point.")
    if not _all_finite(tensor):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise AdaMergeXError(f"adapter {adapter.name!r}, tensor {key!r}: {n_bad} NaN/Inf values.")


def _parse_lora(adapter: AdapterWeights) -> dict[str, _LoraModule]:
    cfg: LoraConfig = adapter.peft_config
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.state_dict.items():
        for suffix in LORA_SUFFIXES:
            if key.endswith(suffix):
                halves.setdefault(key[: -len(suffix)], {})[suffix] = tensor
                break
        else:
            what = (
                "a DoRA magnitude vector"
                if "lora_magnitude_vector" in key
                else "an embedding/conv LoRA factor"
                if "lora_embedding" in key
                else "a LoRA bias"
                if ".lora_B.bias" in key
                else "not a LoRA factor"
            )
            raise AdaMergeXError(
                f"adapter {adapter.name!r}, tensor {key!r}: {what}; only Linear/Conv1D LoRA is supported."
            )
        _check_finite(adapter, key, tensor)
    modules: dict[str, _LoraModule] = {}
    for module, pair in halves.items():
        if len(pair) != 2:
            missing = [s for s in LORA_SUFFIXES if s not in pair][0]
            raise AdaMergeXError(f"adapter {adapter.name!r}, module {module!r}: missing {missing[1:]!r}.")
        a, b = pair[LORA_SUFFIXES[0]], pair[LORA_SUFFIXES[1]]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdaMergeXError(
                f"adapter {adapter.name!r}, module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                "are not factors of one update (expected r x in and out x r)."
            )
        target = module_target_name(module)
        rank = a.shape[0]
        if rank == 0:
            raise AdaMergeXError(
                f"adapter {adapter.name!r}, module {target!r}: rank-0 LoRA factors (lora_A is 0 x in)."
            )
        rank_pattern = cfg.rank_pattern or {}
        r_key = get_pattern_key(rank_pattern.keys(), target) if rank_pattern else None
        r_field, r = (f"rank_pattern[{r_key!r}]", rank_pattern[r_key]) if r_key in rank_pattern else ("r", cfg.r)
        if not _is_positive_int(r) or int(r) != rank:
            raise AdaMergeXError(
                f"adapter {adapter.name!r}, module {target!r}: adapter_config {r_field}={r!r} does not match the "
                f"rank {rank} of its lora_A/lora_B tensors."
            )
        alpha_pattern = cfg.alpha_pattern or {}
        alpha_key = get_pattern_key(alpha_pattern.keys(), target) if alpha_pattern else None
        a_field, alpha = (
            (f"alpha_pattern[{alpha_key!r}]", alpha_pattern[alpha_key])
            if alpha_key in alpha_pattern
            else ("lora_alpha", cfg.lora_alpha)
        )
        if not is_finite_real(alpha):
            raise AdaMergeXError(
                f"adapter {adapter.name!r}, module {target!r}: adapter_config {a_field}={alpha!r} is not a finite number."
            )
        modules[module] = _LoraModule(a, b, mu.lora_scaling(float(alpha), rank, bool(cfg.use_rslora)))
    if not modules:
        raise AdaMergeXError(f"adapter {adapter.name!r} has no LoRA weights.")
    return modules


def _parse_ia3(adapter: AdapterWeights) -> dict[str, torch.Tensor]:
    vectors: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.state_dict.items():
        if not key.endswith(IA3_SUFFIX):
            raise AdaMergeXError(f"adapter {adapter.name!r}, tensor {key!r}: not an (IA)^3 scaling vector.")
        _check_finite(adapter, key, tensor)
        if tensor.dim() != 2 or 1 not in tensor.shape:
            raise AdaMergeXError(
                f"adapter {adapter.name!r}, tensor {key!r}: shape {tuple(tensor.shape)} is not an (IA)^3 vector."
            )
        vectors[key[: -len(IA3_SUFFIX)]] = tensor
    if not vectors:
        raise AdaMergeXError(f"adapter {adapter.name!r} has no (IA)^3 weights.")
    return vectors


# ---------------------------------------------------------------------------------------- the engine
def merge_state_dicts(
    task: AdapterWeights,
    source_reference: AdapterWeights,
    target_reference: AdapterWeights,
    config: AdaMergeXConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    allow_different_base_models: bool | None = None,
) -> MergeResult:
    """Merge three adapters with AdaMergeX (or a baseline) into one ordinary PEFT adapter.

    LoRA (additive), per module, with ``dW_X = s_X B_X A_X`` and a module missing from an adapter
    counting as ``dW_X = 0``:

    ==================  =============================================================================
    method              update
    ==================  =============================================================================
    adamergex           ``dW_T + t (dW_Rg - dW_Rs)``
    task_only           ``dW_T``
    task_plus_target    ``dW_T + t dW_Rg``
    arimerge            ``A = c0 A_T + c1 (A_Rg + A_Rs)``, ``B = c0 B_T + c1 (B_Rg - B_Rs)``
    cross               ``A = A_T * (t (A_Rg / A_Rs - 1) + 1)``, same for ``B`` (element-wise)
    ==================  =============================================================================

    ``lora_strategy`` picks the representation for the first three: ``exact`` stacks the factors
    (rank ``sum r``, scaling 1, exact), ``svd`` truncates that to ``svd_rank`` (``report`` has the
    kept energy per module), ``factorwise`` combines ``A`` and ``B`` separately like the official
    code (``A_T + t (A_Rg - A_Rs)``; needs equal ranks and scalings). ``arimerge`` and ``cross`` are
    factor-level by definition and need equal ranks and scalings too.

    (IA)^3 (multiplicative), per module, a missing module counting as ``l = 1``:

    ==================  =============================================================================
    adamergex           linear: ``l_T (t (l_Rg / l_Rs - 1) + 1)``; power: ``l_T (l_Rg / l_Rs) ** t``
    task_only           ``l_T``
    task_plus_target    as adamergex with ``l_Rs = 1``
    arimerge            ``(1 - c0) + c0 l_T + c1 (l_Rg - l_Rs)``
    cross               ``l_T + t (l_Rg - l_Rs)``
    ==================  =============================================================================

    The methods are the objects registered in :data:`adamergex_peft.methods.METHODS` (the table
    above lists the built-ins); the method's ``roles`` say which adapters it reads, its ``lora`` /
    ``ia3`` entries how they combine.

    Computation is in float32 on ``device`` (default: the task adapter's); the result has ``dtype``
    (default: the task adapter's) and every output tensor is checked for NaN/Inf *in that dtype*
    (an fp16 result that overflows is refused, naming the module and the dtype).

    Adapters from different base models are refused: a reference adapter whose modules do not
    overlap the task adapter's at all, or (unless ``allow_different_base_models`` / the config field
    of that name is true, which only logs a warning) a different non-empty ``base_model_name_or_path``.

    ``pad_rank`` (LoRA) zero-pads the factors of every module to that rank (``'vllm'``: vLLM's next
    allowed ``--max-lora-rank`` at or above the needed rank): ``B' A' = B A`` exactly, with one ``r``
    and one ``lora_alpha`` (``alpha = r`` for the stacked/svd representations, whose scaling is 1;
    ``alpha = s * r`` for factor-level ones, keeping their common scaling ``s``). ``report`` has
    ``rank`` (the output's) and ``needed_rank`` (before padding). A ``pad_rank`` below the needed
    rank is refused (truncate with ``lora_strategy='svd'`` instead); (IA)^3 ignores it (logged).

    ``svd_rank`` larger than the largest ``min(in, out)`` of the merged modules is capped to it (a
    larger rank would only add zero padding); the cap is logged and recorded in ``report``.

    Raises:
        AdaMergeXError: invalid or incompatible input, naming the adapter and module. Nothing is
            modified: the input tensors are only read.
    """
    if not isinstance(config, AdaMergeXConfig):
        raise AdaMergeXError(f"config must be an AdaMergeXConfig, got {type(config).__name__}.")
    config.validate()  # the fields may have been changed since construction
    method = get_method(config.method)
    adapters = {"T": task, "Rs": source_reference, "Rg": target_reference}
    for adapter in adapters.values():
        _check_config(adapter)
    types = {role: a.peft_config.peft_type for role, a in adapters.items()}
    if len(set(types.values())) != 1:
        listing = ", ".join(f"{adapters[r].name!r} is {types[r].value}" for r in ("T", "Rs", "Rg"))
        raise AdaMergeXError(f"adapters of different types cannot be merged: {listing}.")
    first = next(iter(task.state_dict.values()), None)
    if first is None:
        raise AdaMergeXError(f"adapter {task.name!r} has no weights.")
    device = torch.device(device) if device is not None else first.device
    dtype = dtype or first.dtype

    if allow_different_base_models is None:
        allow_different_base_models = config.allow_different_base_models
    _check_same_base_model(adapters, allow_different_base_models)

    weights = method.role_weights(config.t)
    used = {role: adapters[role] for role in weights}
    _warn_ignored_settings(config, method, types["T"])
    if types["T"] == PeftType.LORA:
        return _merge_lora(used, weights, config, method, device, dtype)
    return _merge_ia3(used, weights, config, method, device, dtype)


def _module_names(adapter: AdapterWeights) -> set[str]:
    """The modules an adapter trains, from its state dict keys (no parsing or checks)."""
    names = set()
    for key in adapter.state_dict:
        for suffix in (*LORA_SUFFIXES, IA3_SUFFIX):
            if key.endswith(suffix):
                names.add(key[: -len(suffix)])
                break
    return names


def _check_same_base_model(adapters: dict[str, AdapterWeights], allow_different: bool) -> None:
    """Refuse adapters that cannot come from one base model (see :func:`merge_state_dicts`)."""
    task_modules = _module_names(adapters["T"])
    for role in ("Rs", "Rg"):
        modules = _module_names(adapters[role])
        if task_modules and modules and not (task_modules & modules):
            example = module_target_name(sorted(modules)[0])
            raise AdaMergeXError(
                f"{_ROLE_NAMES[role]} {adapters[role].name!r} trains none of the task adapter {adapters['T'].name!r}'s "
                f"modules (e.g. it has {example!r}, the task adapter {module_target_name(sorted(task_modules)[0])!r}); "
                "adapters from different base models cannot be merged."
            )
    bases = {role: getattr(a.peft_config, "base_model_name_or_path", None) for role, a in adapters.items()}
    named = {role: b for role, b in bases.items() if isinstance(b, str) and b}
    if len(set(named.values())) > 1:
        listing = ", ".join(f"{adapters[r].name!r}: {b!r}" for r, b in named.items())
        if not allow_different:
            raise AdaMergeXError(
                f"the adapters were trained on different base models ({listing}); pass "
                "allow_different_base_models=True (--allow-different-base-models) if they share the same weights.",
                field="allow_different_base_models",
            )
        logger.warning("merging adapters trained on different base models (%s)", listing)


_ROLE_NAMES = {"T": "task adapter", "Rs": "source reference adapter", "Rg": "target reference adapter"}


def _module_error(module: str, err: object, used: dict[str, AdapterWeights]) -> AdaMergeXError:
    """Name the module and, for the roles the message mentions (T, Rs, Rg), the adapters."""
    legend = "; ".join(f"{role} = {_ROLE_NAMES[role]} {a.name!r}" for role, a in used.items())
    return AdaMergeXError(f"module {module_target_name(module)!r}: {err} [{legend}]")


def _warn_ignored_settings(config: AdaMergeXConfig, method: MergeMethod, peft_type: PeftType) -> None:
    """Log the options set away from their default that this merge does not read.

    An option is read if the method declares it (``MergeMethod.options``) and it applies to the
    adapter type (``OPTION_PEFT_TYPES``); ``svd_rank`` is read only with ``lora_strategy='svd'``.
    """
    kind = "LORA" if peft_type == PeftType.LORA else "IA3"
    ignored = []
    for option, default in OPTION_DEFAULTS.items():
        default = method.options.get(option, default)
        value = getattr(config, option)
        if value == default or (isinstance(default, tuple) and tuple(value) == default):
            continue
        applies_to = OPTION_PEFT_TYPES[option]
        if applies_to is not None and applies_to != kind:
            ignored.append(f"{option}={value!r} ({'LoRA' if kind == 'LORA' else '(IA)^3'} adapters)")
        elif option not in method.options:
            why = "is factor-level" if (kind == "LORA" and method.factor_level) else "does not read it"
            ignored.append(f"{option}={value!r} (method {method.name!r} {why})")
        elif option == "svd_rank" and config.lora_strategy != "svd":
            ignored.append(f"svd_rank={value!r} (lora_strategy is not 'svd')")
    if config.pad_rank is not None and kind != "LORA":
        ignored.append(f"pad_rank={config.pad_rank!r} ((IA)^3 adapters have no rank)")
    if ignored:
        logger.warning("AdaMergeX %s merge ignores: %s", config.method, ", ".join(ignored))


def _not_finite_message(config: AdaMergeXConfig, dtype: torch.dtype) -> str:
    return (
        f"the {config.method} merge (t={config.t:g}) has NaN/Inf values in the output dtype "
        f"{str(dtype).replace('torch.', '')}; use a smaller |t| or a wider dtype"
    )


def _check_shapes(module: str, shapes: dict[str, tuple[int, ...]], adapters: dict[str, AdapterWeights], what: str):
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{adapters[r].name!r}: {s}" for r, s in shapes.items())
        raise AdaMergeXError(
            f"module {module_target_name(module)!r}: {what} differ between adapters ({listing}); were they trained on "
            "the same base model?"
        )


def _merge_lora(used, weights, config, method: MergeMethod, device, dtype) -> MergeResult:
    parsed = {role: _parse_lora(adapter) for role, adapter in used.items()}
    lora_combine = method.lora_combine(config.lora_strategy)
    combine, representation = lora_combine.fn, lora_combine.representation
    modules = sorted(set().union(*parsed.values()))
    task_cfg: LoraConfig = used["T"].peft_config

    uniform = None
    capped = None
    if representation == "uniform":
        uniform = _uniform_rank_and_scaling(parsed, used, config, method)
        out_rank = uniform[0]
    elif representation == "svd":
        out_rank = config.svd_rank or task_cfg.r
        bound = max(min(m.a.shape[1], m.b.shape[0]) for mods in parsed.values() for m in mods.values())
        if out_rank > bound:
            logger.warning(
                "svd_rank=%d exceeds the largest min(in, out) of the merged modules (%d): using rank %d",
                out_rank,
                bound,
                bound,
            )
            capped, out_rank = out_rank, bound
    else:  # stacked: the largest sum of ranks; modules trained by fewer adapters are zero-padded
        out_rank = max(sum(parsed[r][m].rank for r in parsed if m in parsed[r]) for m in modules)

    needed_rank = out_rank
    padded_rank = _padded_rank(config, needed_rank)

    state_dict: dict[str, torch.Tensor] = {}
    kept: dict[str, float] = {}
    for module in modules:
        present = {r: parsed[r][module] for r in parsed if module in parsed[r]}
        _check_shapes(
            module, {r: (m.a.shape[1], m.b.shape[0]) for r, m in present.items()}, used, "(in, out) features"
        )
        mods = {r: _LoraModule(m.a.to(device), m.b.to(device), m.scaling) for r, m in present.items()}
        module_weights = {r: w for r, w in weights.items() if r in mods or representation == "uniform"}
        try:
            (a, b), kept_share = combine(mods, module_weights, config, out_rank, dtype)
        except AdaMergeXError as err:
            raise _module_error(module, err, used) from None
        if not (_all_finite(a) and _all_finite(b)):
            raise _module_error(module, _not_finite_message(config, a.dtype), used)
        if kept_share is not None:
            kept[module_target_name(module)] = kept_share
        if padded_rank != a.shape[0]:  # zero rows of A / columns of B: B' A' = B A exactly
            from adamergex_peft.serving import pad_lora_rank

            a, b = pad_lora_rank(a, b, padded_rank)
        state_dict[module + LORA_SUFFIXES[0]] = a.contiguous()
        state_dict[module + LORA_SUFFIXES[1]] = b.contiguous()

    out_rank = padded_rank
    if representation == "uniform":
        _, scaling = uniform
        alpha, use_rslora = scaling * out_rank, False  # the common scaling, kept at the (padded) rank
    else:
        alpha, use_rslora = float(out_rank), False  # scaling 1: the scalings are folded into A
    if float(alpha).is_integer():
        alpha = int(alpha)
    peft_config = dataclasses.replace(
        task_cfg,
        r=out_rank,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        target_modules=sorted(module_target_name(m) for m in modules),
        rank_pattern={},
        alpha_pattern={},
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        init_lora_weights=True,
        inference_mode=True,
    )
    report: dict[str, Any] = {
        "peft_type": "LORA",
        "rank": out_rank,
        "needed_rank": needed_rank,
        "modules": len(modules),
    }
    if capped is not None:
        report["svd_rank_requested"] = capped
    if kept:
        report["svd_kept_energy"] = kept
        report["svd_kept_energy_min"] = min(kept.values())
        logger.info(
            "svd merge to rank %d keeps %.4f of the update's energy (worst module; mean %.4f)",
            needed_rank,
            min(kept.values()),
            sum(kept.values()) / len(kept),
        )
    return MergeResult(peft_config, state_dict, report)


def _padded_rank(config: AdaMergeXConfig, needed: int) -> int:
    """The rank of the output: ``needed``, or ``config.pad_rank`` (``'vllm'``: vLLM's next allowed rank).

    Raises:
        AdaMergeXError: ``pad_rank`` below ``needed`` (suggests an svd merge to that rank instead), or
            ``'vllm'`` with a needed rank above vLLM's largest ``--max-lora-rank``.
    """
    from adamergex_peft.serving import VLLM_MAX_LORA_RANKS, vllm_padded_rank

    if config.pad_rank is None:
        return needed
    if config.pad_rank == "vllm":
        if needed > VLLM_MAX_LORA_RANKS[-1]:
            raise AdaMergeXError(
                f"pad_rank='vllm': this merge needs rank {needed}, above vLLM's largest --max-lora-rank "
                f"{VLLM_MAX_LORA_RANKS[-1]}; use --lora-strategy svd --svd-rank {VLLM_MAX_LORA_RANKS[-1]} to truncate.",
                field="pad_rank",
            )
        return vllm_padded_rank(needed)
    if config.pad_rank < needed:
        raise AdaMergeXError(
            f"pad_rank={config.pad_rank} is below the rank {needed} this merge needs (method {config.method!r}, "
            f"lora_strategy {config.lora_strategy!r}); padding cannot lower a rank: use --lora-strategy svd "
            f"--svd-rank {config.pad_rank} (lora_strategy='svd', svd_rank={config.pad_rank}) to truncate instead.",
            field="pad_rank",
        )
    return config.pad_rank


def _uniform_rank_and_scaling(parsed, used, config, method: MergeMethod) -> tuple[int, float]:
    """Factor-level formulas need one rank and one scaling across all modules of all adapters."""
    seen: dict[tuple[int, float], str] = {}
    for role, mods in parsed.items():
        for module, m in mods.items():
            key = (m.rank, m.scaling)
            if not any(k[0] == key[0] and math.isclose(k[1], key[1], rel_tol=1e-6) for k in seen):
                seen[key] = f"{used[role].name!r} module {module_target_name(module)!r}"
    if len(seen) > 1:
        listing = "; ".join(f"{where}: rank {r}, scaling {s:g}" for (r, s), where in seen.items())
        hint = "" if method.factor_level else " Use lora_strategy='exact' or 'svd' for such adapters."
        raise AdaMergeXError(
            f"method {config.method!r} (lora_strategy {config.lora_strategy!r}) combines A and B separately and needs "
            f"one rank and one scaling in all adapters, found: {listing}.{hint}"
        )
    return next(iter(seen))


def _merge_ia3(used, weights, config, method: MergeMethod, device, dtype) -> MergeResult:
    parsed = {role: _parse_ia3(adapter) for role, adapter in used.items()}
    combine = method.ia3
    modules = sorted(set().union(*parsed.values()))
    state_dict: dict[str, torch.Tensor] = {}
    feedforward: list[str] = []
    for module in modules:
        present = {r: parsed[r][module] for r in parsed if module in parsed[r]}
        _check_shapes(module, {r: tuple(v.shape) for r, v in present.items()}, used, "(IA)^3 vector shapes")
        vecs = {r: v.to(device=device, dtype=torch.float32) for r, v in present.items()}
        try:
            out = combine(vecs, weights, config)
        except AdaMergeXError as err:
            raise _module_error(module, err, used) from None
        out = out.to(dtype)  # checked in the output dtype: a float32 value can overflow fp16/bf16
        if not _all_finite(out):
            raise _module_error(module, _not_finite_message(config, dtype), used)
        state_dict[module + IA3_SUFFIX] = out.contiguous()
        vec = next(iter(present.values()))
        if vec.shape[0] == 1 and vec.shape[1] != 1:  # (1, in_features): feed-forward module
            feedforward.append(module_target_name(module))
    task_cfg: IA3Config = used["T"].peft_config
    peft_config = dataclasses.replace(
        task_cfg,
        target_modules=sorted(module_target_name(m) for m in modules),
        feedforward_modules=sorted(feedforward),
        exclude_modules=None,
        init_ia3_weights=True,
        inference_mode=True,
    )
    return MergeResult(peft_config, state_dict, {"peft_type": "IA3", "modules": len(modules)})
