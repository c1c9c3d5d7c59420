"""Start-up hook that makes ``lm_eval --model adamergex`` and the AdaMergeX tasks visible to lm-eval.

lm-evaluation-harness 0.4.13 has no plugin discovery: it reads no entry points, and a model
registered *before* :mod:`lm_eval.models` is imported hides every built-in model (the registry
only imports its built-ins when it is empty). This module is therefore run at interpreter start
by ``adamergex_lm_eval.pth`` (installed at the root of site-packages) and does nothing but add
one :class:`importlib.abc.MetaPathFinder` to :data:`sys.meta_path`. It imports only the standard
library, so a Python process that never touches lm-eval pays a dictionary lookup per import
and nothing else: neither torch, transformers, lm_eval nor adamergex_peft is imported.

The finder waits for two lm-eval modules to finish executing:

* ``lm_eval.models`` (which fills the registry with lazy placeholders for the built-in models):
  ``"adamergex"`` is then registered the same way, as the lazy placeholder
  ``"adamergex_lm_eval.model:AdaMergeXLM"``. Nothing is imported until ``--model adamergex`` is
  actually requested, and the built-in models stay visible.
* ``lm_eval.tasks``: :class:`~lm_eval.tasks.TaskManager` is wrapped so that a manager
  that indexes lm-eval's built-in tasks (``include_defaults=True``, what the ``lm_eval`` CLI
  does) also indexes the installed ``adamergex_*`` task folder, placed before any
  ``--include_path`` so a user's own folders still take precedence. A manager built with
  ``include_defaults=False`` is left alone.

Set ``ADAMERGEX_LM_EVAL_HOOK=0`` to disable the hook (then use ``python -m adamergex_lm_eval``
and ``--include_path "$(adamergex tasks-dir)"``).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not ``from typing import ...``: typing costs start-up time
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

MODEL_NAME = "adamergex"
MODEL_TARGET = "adamergex_lm_eval.model:AdaMergeXLM"
DISABLE_ENV = "ADAMERGEX_LM_EVAL_HOOK"

_MODELS_MODULE = "lm_eval.models"
_TASKS_MODULE = "lm_eval.tasks"  # whose TaskManager is lm_eval.tasks.manager.TaskManager in 0.4.13


def register_model() -> None:
    """Register ``"adamergex"`` in lm-eval's model registry as a lazy placeholder.

    Must run after :mod:`lm_eval.models` is imported (otherwise the built-in models would be
    hidden); :mod:`lm_eval.models` is imported here if needed. Idempotent.
    """
    import lm_eval.models  # noqa: F401  (fills the registry with the built-ins first)

    try:
        from lm_eval.api.registry import model_registry
    except ImportError:
        # lm-eval < 0.4.10: the registry is a plain dict and lm_eval.models has already imported every
        # built-in model (torch included), so importing ours now costs little; it registers itself.
        import adamergex_lm_eval.model  # noqa: F401

        return
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def _tasks_dir() -> str | None:
    """The folder ``adamergex tasks-dir`` prints, found without importing adamergex_peft.

    Same rule as :func:`adamergex_peft.commands.tasks_dir.find_tasks_dir` (inside the installed
    package, else ``<checkout>/lm_eval_tasks``), so that a ``--model hf`` run does not execute
    adamergex_peft at all.
    """
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("adamergex_peft")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        package_dir = Path(location).resolve()
        for candidate in (package_dir / "lm_eval_tasks", package_dir.parent / "lm_eval_tasks"):
            if candidate.is_dir():
                return str(candidate)
    return None


def patch_task_manager() -> None:
    """Make ``TaskManager(include_defaults=True)`` also index the AdaMergeX task folder. Idempotent."""
    import functools
    import inspect
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    original = TaskManager.__init__
    if getattr(original, "_adamergex_patched", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
        except TypeError:  # let the original raise its own error
            return original(self, *args, **kwargs)
        folder = _tasks_dir() if bound.arguments.get("include_defaults", False) else None
        if folder is not None:
            include_path = bound.arguments.get("include_path")
            if include_path is None:
                paths = []
            elif isinstance(include_path, (list, tuple)):
                paths = list(include_path)
            else:
                paths = [include_path]
            resolved = {Path(p).expanduser().resolve() for p in paths}
            if Path(folder).resolve() not in resolved:
                bound.arguments["include_path"] = [folder, *paths]
        return original(*bound.args, **bound.kwargs)

    __init__._adamergex_patched = True  # type: ignore[attr-defined]
    TaskManager.__init__ = __init__


_ACTIONS: dict[str, Callable[[], None]] = {
    _MODELS_MODULE: register_model,
    _TASKS_MODULE: patch_task_manager,
}


def _run(name: str) -> None:
    try:
        _ACTIONS[name]()
    except Exception as err:  # never break lm-eval's own import because of the plugin
        import logging

        logging.getLogger(__name__).warning(
            "adamergex-peft: could not hook into %s (%s: %s)", name, type(err).__name__, err
        )


class _LmEvalFinder:
    """A :class:`importlib.abc.MetaPathFinder` (duck-typed: ``importlib.abc`` costs start-up time).

    Finds nothing itself; wraps the real loader of the watched lm-eval modules.
    """

    def __init__(self) -> None:
        self.pending: set[str] = set(_ACTIONS)

    def find_spec(self, fullname, path, target=None):  # noqa: D102
        if fullname not in self.pending:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            loader.exec_module = original_exec
            self.pending.discard(fullname)
            if not self.pending:
                uninstall()
            _run(fullname)

        loader.exec_module = exec_module
        return spec


_FINDER = _LmEvalFinder()


def uninstall() -> None:
    """Remove the finder from :data:`sys.meta_path` (what it already did stays done)."""
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Arrange for the actions above to run when lm-eval loads; run them now for modules already loaded.

    Called from ``adamergex_lm_eval.pth`` at interpreter start. Does nothing when the environment
    variable ``ADAMERGEX_LM_EVAL_HOOK`` is ``0``/``false``/``no``/``off``.
    """
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return
    for name in list(_FINDER.pending):
        if name in sys.modules:
            _FINDER.pending.discard(name)
            _run(name)
    if _FINDER.pending and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
