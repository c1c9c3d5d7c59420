"""Attach ``merge_crosslingual`` methods to ``peft.PeftModel`` without importing peft eagerly.

If ``peft.peft_model`` is already imported, the methods are attached at once. Otherwise a
meta-path finder waits for that module to finish executing, attaches them, and removes itself.
This keeps ``import adamergex_peft`` free of torch/peft start-up cost (several seconds). The
methods import :mod:`adamergex_peft.model` only when called.
"""

from __future__ import annotations

import importlib.abc
import sys

_TARGET = "peft.peft_model"


def merge_crosslingual(self, config, adapter_name: str) -> str:
    """Add the AdaMergeX merge of three of this model's adapters as a new adapter.

    See :func:`adamergex_peft.merge_crosslingual`.
    """
    from adamergex_peft.model import merge_crosslingual as impl

    return impl(self, config, adapter_name)


def merge_crosslingual_into_base(self, config):
    """Add the AdaMergeX update to the base weights in place; returns a handle with ``undo()``.

    See :func:`adamergex_peft.merge_crosslingual_into_base`.
    """
    from adamergex_peft.model import merge_crosslingual_into_base as impl

    return impl(self, config)


def _attach(module) -> None:
    cls = module.PeftModel
    if not hasattr(cls, "merge_crosslingual"):
        cls.merge_crosslingual = merge_crosslingual
    if not hasattr(cls, "merge_crosslingual_into_base"):
        cls.merge_crosslingual_into_base = merge_crosslingual_into_base


class _PeftModelFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ``peft.peft_model`` to run ``_attach``."""

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
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            _uninstall()
            _attach(module)

        loader.exec_module = exec_module
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
