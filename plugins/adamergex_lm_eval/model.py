"""``lm_eval --model adamergex``: evaluate an AdaMergeX-merged adapter in lm-evaluation-harness.

:class:`AdaMergeXLM` is lm-eval's :class:`~lm_eval.models.huggingface.HFLM` (through
:class:`~adamergex_lm_eval.selective_logits.SelectiveLogitsHFLM`, which computes output logits only at
the positions a log-likelihood request scores, with HFLM's results) with one override,
:meth:`~AdaMergeXLM._create_model` (HFLM's documented extension point): after HFLM has loaded the
base model, it loads the task adapter and the two reference adapters with PEFT, builds the
target-language adapter with :mod:`adamergex_peft` and, by default, merges it into the base weights
and unloads PEFT, so evaluation runs at the speed of the base model. Everything else (device,
dtype, batching, ``accelerate launch`` data parallelism, ``parallelize=True``, chat templates) is
HFLM's own.

Example::

    lm_eval --model adamergex \\
        --model_args pretrained=meta-llama/Llama-2-7b-hf,task_adapter=out/xcopa_en,\\
    source_reference_adapter=out/wiki_en,target_reference_adapter=out/wiki_sw,t=1.0,dtype=bfloat16 \\
        --tasks adamergex_xcopa_sw
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import lm_eval.models  # noqa: F401  (register the built-in models before ours, see adamergex_lm_eval._hook)
from lm_eval.api.registry import register_model

from adamergex_lm_eval.selective_logits import SelectiveLogitsHFLM, parse_bool
from adamergex_peft.config import ADAPTER_FIELDS, DEFAULT_ADAPTER_NAMES

# Under lm-eval's logger hierarchy, so lm-eval's handler and level (LMEVAL_LOG_LEVEL) apply to these messages.
logger = logging.getLogger("lm_eval.models.adamergex")

MODEL_NAME = "adamergex"

#: Names the three input adapters get inside the PeftModel (shared with the sweep), and the name of the merged adapter.
ADAPTER_NAMES: dict[str, str] = dict(DEFAULT_ADAPTER_NAMES)
MERGED_ADAPTER_NAME = "adamergex"


def _error(argument: str, message: str) -> ValueError:
    """A one-line error that names the offending model_arg."""
    return ValueError(f"adamergex model_args: {argument}: {message}")


def _parse_float(argument: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _error(argument, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _error(argument, f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _error(argument, f"expected a finite number, got {value!r}")
    return number


def _parse_bool(argument: str, value: Any) -> bool:
    try:
        return parse_bool(value, argument)
    except ValueError:
        raise _error(argument, f"expected true or false, got {value!r}") from None


def _parse_optional_int(argument: str, value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, bool):
        raise _error(argument, f"expected a positive integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _error(argument, f"expected a positive integer, got {value!r}") from None
    if str(number) != str(value).strip() or number < 1:
        raise _error(argument, f"expected a positive integer, got {value!r}")
    return number


def parse_arimerge_weights(value: Any) -> tuple[float, float]:
    """Parse ``arimerge_weights``: ``"c0:c1"`` (e.g. ``"0.5:0.5"``) or a pair of numbers.

    lm-eval splits ``--model_args`` on commas, so the two weights are separated by a colon.
    """
    argument = "arimerge_weights"
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) != 2:
            raise _error(argument, f"expected two numbers 'c0:c1' (e.g. 0.5:0.5), got {value!r}")
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        parts = list(value)
    else:
        raise _error(argument, f"expected two numbers 'c0:c1' (e.g. 0.5:0.5), got {value!r}")
    return (_parse_float(argument, parts[0]), _parse_float(argument, parts[1]))


def _check_adapter(argument: str, location: str, revision: str | None, token: Any) -> str:
    """Read the adapter's PEFT config (a local folder or a hub id); return its peft type."""
    from peft import PeftConfig

    if os.path.isdir(location) and not os.path.isfile(os.path.join(location, "adapter_config.json")):
        raise _error(argument, f"{location!r} is a folder without adapter_config.json (not a PEFT adapter)")
    kwargs: dict[str, Any] = {}
    if revision is not None:
        kwargs["revision"] = revision
    if token is not None:
        kwargs["token"] = token
    try:
        config = PeftConfig.from_pretrained(location, **kwargs)
    except Exception as err:  # hub/IO/JSON errors: report them on one line, naming the argument
        reason = " ".join(str(err).split())[:300]
        raise _error(
            argument, f"cannot load a PEFT adapter from {location!r} (not a local folder or hub id?): {reason}"
        ) from err
    return str(getattr(config.peft_type, "value", config.peft_type))


def _check_required(pretrained: Any, locations: dict[str, Any]) -> None:
    """Name every missing required argument in one message, as argparse does."""
    missing = []
    if pretrained is None or (isinstance(pretrained, str) and not pretrained.strip()):
        missing.append("pretrained")
    missing += [k for k, v in locations.items() if not isinstance(v, str) or not v.strip()]
    if len(missing) == 1:
        what = (
            "the base model: a local folder or hub id"
            if missing[0] == "pretrained"
            else "a PEFT adapter folder or hub id"
        )
        raise _error(missing[0], f"required ({what})")
    if missing:
        raise _error(
            ", ".join(missing), "required (pretrained: the base model; adapters: PEFT adapter folders or hub ids)"
        )


def _refuse_single_adapter_arguments(kwargs: dict[str, Any]) -> None:
    """``peft=``/``delta=`` make no sense here: refuse a value, drop an empty one (modifies ``kwargs``)."""
    for argument in ("peft", "delta"):
        if kwargs.get(argument) not in (None, ""):
            raise _error(
                argument,
                "not supported by --model adamergex (the adapter is built from task_adapter, "
                "source_reference_adapter and target_reference_adapter); use --model hf for a single adapter",
            )
        kwargs.pop(argument, None)


def _build_config(**settings: Any):
    """The AdaMergeXConfig for the adapters as named in the PeftModel; errors name the model_arg."""
    from adamergex_peft import AdaMergeXConfig, AdaMergeXError

    try:
        return AdaMergeXConfig.for_default_adapters(**settings)
    except AdaMergeXError as err:
        if err.field is not None and err.field not in ADAPTER_FIELDS:
            raise _error(err.field, str(err)) from None
        raise ValueError(f"adamergex model_args: {err}") from None


def _check_distinct(locations: dict[str, str]) -> None:
    same = {os.path.realpath(v) if os.path.isdir(v) else v for v in locations.values()}
    if len(same) != len(locations):
        source, target = (locations[k] for k in ("source_reference_adapter", "target_reference_adapter"))
        argument = (
            "target_reference_adapter" if os.path.realpath(source) == os.path.realpath(target) else "task_adapter"
        )
        raise _error(argument, "the three adapters must be different (the same adapter is given twice)")


def _check_adapters(locations: dict[str, str], revision: str | None, token: Any) -> str:
    """Read the three adapters' PEFT configs; they must share one PEFT type, which is returned."""
    peft_types = {
        argument: _check_adapter(argument, location, revision, token) for argument, location in locations.items()
    }
    if len(set(peft_types.values())) != 1:
        found = ", ".join(f"{k}={v}" for k, v in peft_types.items())
        raise _error(
            "target_reference_adapter"
            if peft_types["target_reference_adapter"] != peft_types["task_adapter"]
            else "source_reference_adapter",
            f"the three adapters must have the same PEFT type, got {found}",
        )
    return peft_types["task_adapter"]


@register_model(MODEL_NAME)
class AdaMergeXLM(SelectiveLogitsHFLM):
    """HFLM evaluating the AdaMergeX target-language adapter built from three PEFT adapters.

    AdaMergeX (Zhao et al., NAACL 2025) builds ``A(g, T) = A(s, T) (+) t * (A(g, R) (-) A(s, R))``
    from a task adapter trained in the source language, and two reference adapters (causal LM on
    plain text) in the source and the target language; see :class:`adamergex_peft.AdaMergeXConfig`.

    Args:
        pretrained: The base model (local folder or hub id), as for ``--model hf``.
        task_adapter: PEFT adapter (LoRA or (IA)^3) trained on the task in the source language.
        source_reference_adapter: Reference adapter in the source language.
        target_reference_adapter: Reference adapter in the target language.
        t: Scale of the language gap (0: the task adapter as is; 1: the literal analogy).
        method: a registered merge method (``adamergex_peft.methods.METHODS``): ``adamergex``
            (default) or a baseline of the paper (``cross``, ``arimerge``, ``task_only``,
            ``task_plus_target``); ``python -c "import adamergex_peft.methods as m; print(m.methods_help())"``
            lists them with their references.
        lora_strategy: ``exact`` (default), ``svd`` or ``factorwise``.
        ia3_strategy: ``linear`` (default) or ``power``.
        svd_rank: Rank for ``lora_strategy=svd`` (default: the task adapter's rank).
        arimerge_weights: ``"c0:c1"`` for ``method=arimerge`` (default ``"0.5:0.5"``).
        merge_into_base: If true (default), add the merged update into the base weights and unload
            PEFT (plain transformers model, base-model speed). If false, keep a PeftModel with the
            merged adapter active (the three inputs are deleted from it).
        allow_different_base_models: If true, adapters whose ``base_model_name_or_path`` differ are
            merged with a warning instead of refused.
        adapter_revision: Hub revision of the three adapters (default: PEFT's default). HFLM's
            ``revision`` applies to the base model only.
        **kwargs: Every other HFLM argument (``dtype``, ``device``, ``batch_size``, ``revision``,
            ``trust_remote_code``, ``parallelize``, ``max_length``, ...). ``peft`` and ``delta`` are
            refused: the adapter is built from the three inputs.

    Raises:
        ValueError: A missing or invalid argument, with a one-line message naming it.
    """

    def __init__(
        self,
        pretrained: Any = None,
        task_adapter: str | None = None,
        source_reference_adapter: str | None = None,
        target_reference_adapter: str | None = None,
        t: float | str = 1.0,
        method: str = "adamergex",
        lora_strategy: str = "exact",
        ia3_strategy: str = "linear",
        svd_rank: int | str | None = None,
        arimerge_weights: str | tuple[float, float] = "0.5:0.5",
        merge_into_base: bool | str = True,
        adapter_revision: str | None = None,
        allow_different_base_models: bool | str = False,
        **kwargs: Any,
    ) -> None:
        locations = {
            "task_adapter": task_adapter,
            "source_reference_adapter": source_reference_adapter,
            "target_reference_adapter": target_reference_adapter,
        }
        _check_required(pretrained, locations)
        _refuse_single_adapter_arguments(kwargs)
        self._adamergex_config = _build_config(
            t=_parse_float("t", t),
            method=str(method),
            lora_strategy=str(lora_strategy),
            ia3_strategy=str(ia3_strategy),
            svd_rank=_parse_optional_int("svd_rank", svd_rank),
            arimerge_weights=parse_arimerge_weights(arimerge_weights),
            allow_different_base_models=_parse_bool("allow_different_base_models", allow_different_base_models),
        )
        self._adapter_locations = {k: v.strip() for k, v in locations.items()}
        _check_distinct(self._adapter_locations)
        self._adapter_revision = None if adapter_revision is None else str(adapter_revision)
        self._merge_into_base = _parse_bool("merge_into_base", merge_into_base)
        # Fail fast, before the (possibly large) base model is loaded.
        self._hub_token = kwargs.get("token")
        self._adamergex_peft_type = _check_adapters(self._adapter_locations, self._adapter_revision, self._hub_token)

        if not isinstance(pretrained, str):
            # A model object: HFLM skips _create_model, so build the merged model here.
            pretrained = self._apply_adamergex(pretrained, tokenizer=kwargs.get("tokenizer"))
        super().__init__(pretrained=pretrained, **kwargs)

    # ------------------------------------------------------------------ HFLM override point
    def _create_model(self, pretrained: str, **kwargs: Any) -> None:
        """Load the base model with HFLM's own loader, then build and apply the AdaMergeX adapter."""
        kwargs["peft"] = None
        kwargs["delta"] = None
        super()._create_model(pretrained, **kwargs)
        self._model = self._apply_adamergex(self._model, tokenizer=self.tokenizer)

    def _apply_adamergex(self, model: Any, tokenizer: Any = None) -> Any:
        """Load the three adapters on ``model``, merge them, and return the model to evaluate."""
        from peft import PeftModel

        from adamergex_peft import merge_crosslingual, merge_crosslingual_into_base

        # As HFLM does before loading a `peft=` adapter: adapters trained with added tokens.
        config = model.config
        text_config = getattr(config, "text_config", None)
        vocab_size = getattr(text_config, "vocab_size", None) or config.vocab_size
        if tokenizer is not None and not isinstance(tokenizer, str) and vocab_size != len(tokenizer):
            logger.info("Resizing the embeddings from %d to the tokenizer's %d tokens.", vocab_size, len(tokenizer))
            model.resize_token_embeddings(len(tokenizer))

        hub_kwargs: dict[str, Any] = {}
        if self._adapter_revision is not None:
            hub_kwargs["revision"] = self._adapter_revision
        if self._hub_token is not None:
            hub_kwargs["token"] = self._hub_token
        order = ADAPTER_FIELDS
        first, *others = order
        logger.info("Loading adapters %s", {k: self._adapter_locations[k] for k in order})
        peft_model = PeftModel.from_pretrained(
            model, self._adapter_locations[first], adapter_name=ADAPTER_NAMES[first], **hub_kwargs
        )
        for argument in others:
            peft_model.load_adapter(
                self._adapter_locations[argument], adapter_name=ADAPTER_NAMES[argument], **hub_kwargs
            )

        cfg = self._adamergex_config
        if self._merge_into_base:
            # One-shot: PEFT is unloaded right after, so nothing is kept for an undo (exact_undo=False).
            merge_crosslingual_into_base(peft_model, cfg, exact_undo=False)
            logger.info("Merged the AdaMergeX update (t=%s, method=%s) into the base weights.", cfg.t, cfg.method)
            return peft_model.unload()
        name = merge_crosslingual(peft_model, cfg, MERGED_ADAPTER_NAME)
        peft_model.set_adapter(name)
        for adapter_name in ADAPTER_NAMES.values():
            peft_model.delete_adapter(adapter_name)
        logger.info(
            "Built the AdaMergeX adapter %r (t=%s, method=%s), active on a PeftModel.", name, cfg.t, cfg.method
        )
        return peft_model

    def get_model_info(self) -> dict[str, Any]:
        """HFLM's model info plus the AdaMergeX inputs and settings (written to the results JSON)."""
        info = super().get_model_info()
        info["adamergex"] = {
            "adapters": dict(self._adapter_locations),
            "adapter_revision": self._adapter_revision,
            "peft_type": self._adamergex_peft_type,
            "merge_into_base": self._merge_into_base,
            "config": self._adamergex_config.to_dict(),
        }
        return info


def _document_methods() -> None:
    """Append the registered methods (name, reference) to the class docstring, from the registry."""
    from adamergex_peft.methods import METHODS

    if AdaMergeXLM.__doc__:
        lines = "\n".join(f"        ``{m.name}``: {m.reference}" for m in METHODS.values())
        AdaMergeXLM.__doc__ += f"\n    Methods (``method=``, from ``adamergex_peft.methods.METHODS``)::\n\n{lines}\n"


_document_methods()
