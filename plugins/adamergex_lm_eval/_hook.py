"""The distribution's one post-import hook, and its use for lm-evaluation-harness 0.4.13.

Standard library only: ``adamergex_lm_eval.pth`` runs :func:`install` at interpreter start, so a
Python process that never imports lm-eval pays one dictionary lookup per import and nothing else
(neither torch, transformers, lm_eval nor adamergex_peft is imported).

:func:`when_imported` runs a callback right after a module has executed (at once if it already
has). While a callback is pending, one finder sits in :data:`sys.meta_path`; it finds nothing
itself: for a watched name it takes the spec the other finders return and wraps its loader (the
real loader is not modified, it may be shared by many modules). The finder removes itself when
nothing is pending. ``adamergex_peft`` uses the same function to attach
``PeftModel.merge_crosslingual`` when ``peft`` is imported.

What :func:`install` arranges, because lm-eval 0.4.13 reads no plugin entry points:

* after ``lm_eval.models`` (which fills the model registry with lazy placeholders for the built-in
  models; registering earlier would hide them): ``"adamergex"`` is registered the same way, as the
  placeholder ``"adamergex_lm_eval.model:AdaMergeXLM"``. Nothing is imported until
  ``--model adamergex`` is asked for. An lm-eval that loads the ``lm_eval.models`` entry-point
  group (declared in ``pyproject.toml``) is left to do it: the hook steps aside.
* after ``lm_eval.tasks``: ``TaskManager.__init__`` is wrapped so that a manager indexing lm-eval's
  built-in tasks (``include_defaults=True``, what the ``lm_eval`` CLI builds) also indexes the
  installed ``adamergex_*`` task folder, before any ``--include_path`` (a user's folders still win).
  A manager built with ``include_defaults=False`` is left alone.

Set ``ADAMERGEX_LM_EVAL_HOOK=0`` to disable the lm-eval part (then use ``python -m adamergex_lm_eval``
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
#: Functions by which an lm-eval version that reads the ``lm_eval.models`` entry-point group would
#: load it (looked up in ``lm_eval.api.registry``); if one exists, :func:`register_model` steps aside.
ENTRY_POINT_LOADERS: tuple[str, ...] = ("load_plugins", "load_entry_points", "discover_plugins")

_MODELS_MODULE = "lm_eval.models"
_TASKS_MODULE = "lm_eval.tasks"  # whose TaskManager is lm_eval.tasks.manager.TaskManager in 0.4.13


# --------------------------------------------------------------------------- the post-import hook
_PENDING: dict[str, list[Callable[[ModuleType], None]]] = {}


class _CallbackLoader:
    """Delegates to a module's real loader, then runs the callbacks pending for that module."""

    def __init__(self, loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        callbacks = _PENDING.pop(self._name, [])
        if not _PENDING:
            _uninstall()
        for callback in callbacks:
            callback(module)

    def __getattr__(self, name: str):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _Finder:
    """A :class:`importlib.abc.MetaPathFinder` (duck-typed: ``importlib.abc`` costs start-up time)."""

    def find_spec(self, fullname, path, target=None):  # noqa: D102
        if fullname not in _PENDING:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(spec.loader, fullname)
        return spec


_FINDER = _Finder()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Run ``callback(module)`` once module ``name`` has executed; at once if it already has.

    An exception from ``callback`` propagates to the import that triggered it.
    """
    module = sys.modules.get(name)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        callback(module)
        return
    _PENDING.setdefault(name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


# --------------------------------------------------------------------------- the lm-eval actions
def reads_entry_points(registry: ModuleType) -> bool:
    """Whether this lm-eval loads the ``lm_eval.models`` entry-point group itself."""
    return any(callable(getattr(registry, name, None)) for name in ENTRY_POINT_LOADERS)


def register_model() -> None:
    """Register ``"adamergex"`` in lm-eval's model registry as a lazy placeholder. Idempotent.

    Must run after :mod:`lm_eval.models` is imported (otherwise the built-in models would be
    hidden); :mod:`lm_eval.models` is imported here if needed. Does nothing on an lm-eval that reads
    entry points (it registers ``adamergex`` from the distribution's ``lm_eval.models`` entry point).
    """
    import lm_eval.models  # noqa: F401  (fills the registry with the built-ins first)
    from lm_eval.api import registry

    if reads_entry_points(registry):
        return
    model_registry = getattr(registry, "model_registry", None)
    if model_registry is None or not hasattr(model_registry, "register"):
        # lm-eval < 0.4.10: a plain dict, and lm_eval.models has already imported every built-in model
        # (torch included), so importing ours now costs little; it registers itself.
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
    """Make ``TaskManager(include_defaults=True)`` also index the AdaMergeX task folder. Idempotent.

    The only change: ``include_path`` gets the folder in front, when the built-in tasks are indexed
    and the folder is not already given.
    """
    import functools
    import inspect
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    original = TaskManager.__init__
    if getattr(original, "_adamergex_wrapped", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:  # let the original raise its own error
            return original(self, *args, **kwargs)
        bound.apply_defaults()
        folder = _tasks_dir() if bound.arguments.get("include_defaults") else None
        if folder is not None:
            given = bound.arguments.get("include_path")
            paths = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
            if Path(folder).resolve() not in {Path(p).expanduser().resolve() for p in paths}:
                bound.arguments["include_path"] = [folder, *paths]
        return original(*bound.args, **bound.kwargs)

    __init__._adamergex_wrapped = True  # type: ignore[attr-defined]
    TaskManager.__init__ = __init__


def _logged(action: Callable[[], None], name: str) -> Callable[[ModuleType], None]:
    def run(_module: ModuleType) -> None:
        try:
            action()
        except Exception as err:  # never break lm-eval's own import because of the plugin
            import logging

            logging.getLogger(__name__).warning(
                "adamergex-peft: could not hook into %s (%s: %s)", name, type(err).__name__, err
            )

    return run


def install() -> None:
    """Arrange the lm-eval actions (run at once for lm-eval modules already imported). Idempotent.

    Called from ``adamergex_lm_eval.pth`` at interpreter start. Does nothing when the environment
    variable ``ADAMERGEX_LM_EVAL_HOOK`` is ``0``/``false``/``no``/``off``.
    """
    global _INSTALLED
    if _INSTALLED or os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return
    _INSTALLED = True
    when_imported(_MODELS_MODULE, _logged(register_model, _MODELS_MODULE))
    when_imported(_TASKS_MODULE, _logged(patch_task_manager, _TASKS_MODULE))


_INSTALLED = False
