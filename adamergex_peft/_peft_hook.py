"""Attach ``merge_crosslingual`` methods to ``peft.PeftModel`` without importing peft eagerly.

If ``peft.peft_model`` is already imported, the methods are attached at once. Otherwise a
meta-path finder waits for that module to finish executing, attaches them, and removes itself.
This keeps ``import adamergex_peft`` free of torch/peft start-up cost (several seconds).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "peft.peft_model"


def _attach() -> None:
    from adamergex_peft.model import attach_to_peft_model

    attach_to_peft_model()


class _PeftModelFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ``peft.peft_model`` to run ``_attach``."""

    def find_spec(self, fullname, path, target=None):  # noqa: D102
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
            _attach()

        loader.exec_module = exec_module
        return spec


_FINDER = _PeftModelFinder()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Attach now if peft is loaded, else arrange to attach when it is."""
    if _TARGET in sys.modules:
        _attach()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
