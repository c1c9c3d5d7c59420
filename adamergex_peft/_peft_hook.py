"""Attach ``merge_crosslingual`` methods to ``peft.PeftModel`` without importing peft eagerly.

If ``peft.peft_model`` is already imported, the methods are attached at once; otherwise when it
has executed, through the distribution's one post-import hook,
:func:`adamergex_lm_eval._hook.when_imported` (standard library only; the same function serves
lm-eval). This keeps ``import adamergex_peft`` free of torch/peft start-up cost (seconds). The
methods import :mod:`adamergex_peft.model` only when called.

A ``PeftModel`` that already has an attribute of either name that is not ours is a name clash
(e.g. a PEFT release that ships its own ``merge_crosslingual``): :class:`ImportError`, never a
silent choice between two meanings of ``model.merge_crosslingual``.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

_TARGET = "peft.peft_model"


def merge_crosslingual(self, config: Any, adapter_name: str) -> str:
    """Add the AdaMergeX merge of three of this model's adapters as a new adapter.

    See :func:`adamergex_peft.merge_crosslingual`.
    """
    from adamergex_peft.model import merge_crosslingual as impl

    return impl(self, config, adapter_name)


def merge_crosslingual_into_base(self, config: Any, **kwargs: Any) -> Any:
    """Add the AdaMergeX update to the base weights in place; returns a handle with ``undo()``.

    See :func:`adamergex_peft.merge_crosslingual_into_base`.
    """
    from adamergex_peft.model import merge_crosslingual_into_base as impl

    return impl(self, config, **kwargs)


METHODS = {"merge_crosslingual": merge_crosslingual, "merge_crosslingual_into_base": merge_crosslingual_into_base}
_MARK = "_adamergex_peft_method"
for _method in METHODS.values():
    setattr(_method, _MARK, True)


def attach(module) -> None:
    """Set the methods on ``module.PeftModel``.

    Raises:
        ImportError: ``PeftModel`` already has an attribute of that name that is not ours.
    """
    cls = getattr(module, "PeftModel", None)
    if cls is None:
        warnings.warn(
            "adamergex_peft: peft.peft_model has no PeftModel; PeftModel.merge_crosslingual is not available "
            "(use adamergex_peft.merge_crosslingual(model, config, name)).",
            stacklevel=2,
        )
        return
    for name in METHODS:
        existing = getattr(cls, name, None)
        if existing is not None and not getattr(existing, _MARK, False):
            raise ImportError(
                f"adamergex_peft: peft.PeftModel already has an attribute {name!r} that is not adamergex_peft's "
                f"(defined by {getattr(existing, '__module__', type(existing).__name__)}); refusing to replace it. "
                "Call adamergex_peft.merge_crosslingual(model, config, name) / merge_crosslingual_into_base(model, "
                "config) instead, and report this to adamergex-peft."
            )
    for name, method in METHODS.items():
        setattr(cls, name, method)


def install() -> None:
    """Attach now if ``peft.peft_model`` is loaded, else when it is."""
    try:
        from adamergex_lm_eval._hook import when_imported
    except ImportError:  # plugins/ not on sys.path: a bare source checkout, not an installation
        module = sys.modules.get(_TARGET)
        if module is not None:
            attach(module)
        else:
            warnings.warn(
                "adamergex_peft: the package adamergex_lm_eval (plugins/ in a checkout) is not importable, so "
                "PeftModel.merge_crosslingual is attached only if peft is imported before adamergex_peft; "
                "install the package (pip install -e .) or call adamergex_peft.merge_crosslingual(model, ...).",
                RuntimeWarning,
                stacklevel=3,
            )
        return
    when_imported(_TARGET, attach)
