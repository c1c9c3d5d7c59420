"""Attach ``merge_crosslingual`` methods to ``peft.PeftModel`` without importing peft eagerly.

If ``peft.peft_model`` is already imported, the methods are attached at once. Otherwise a
meta-path finder waits for that module to finish executing, attaches them, and removes itself.
This keeps ``import adamergex_peft`` free of torch/peft start-up cost (several seconds). The
methods import :mod:`adamergex_peft.model` only when called.
"""

from __future__ import annotations

import importlib.abc
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


def merge_crosslingual_into_base(self, config: Any) -> Any:
    """Add the AdaMergeX update to the base weights in place; returns a handle with ``undo()``.

    See :func:`adamergex_peft.merge_crosslingual_into_base`.
    """
    from adamergex_peft.model import merge_crosslingual_into_base as impl

    return impl(self, config)


def _attach(module) -> None:
    cls = getattr(module, "PeftModel", None)
    if cls is None:
        warnings.warn(
            "adamergex_peft: peft.peft_model has no PeftModel; PeftModel.merge_crosslingual is not available "
            "(use adamergex_peft.merge_crosslingual(model, config, name)).",
            stacklevel=2,
        )
        return
    if not hasattr(cls, "merge_crosslingual"):
        cls.merge_crosslingual = merge_crosslingual
    if not hasattr(cls, "merge_crosslingual_into_base"):
        cls.merge_crosslingual_into_base = merge_crosslingual_into_base


class _AttachingLoader(importlib.abc.Loader):
    """Delegates to the real loader of ``peft.peft_model``, then attaches the methods.

    A wrapper rather than a patched loader: some loaders (zip imports, frozen apps) are shared by
    many modules.
    """

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _uninstall()
        _attach(module)

    def __getattr__(self, name: str):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _PeftModelFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; gives ``peft.peft_model`` a loader that runs ``_attach`` after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _AttachingLoader(spec.loader)
        return spec


_FINDER = _PeftModelFinder()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Attach now if ``peft.peft_model`` is loaded, else arrange to attach when it is."""
    module = sys.modules.get(_TARGET)
    if module is not None and hasattr(module, "PeftModel"):
        _attach(module)
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
