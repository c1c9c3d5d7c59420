"""The import-time machinery: the one post-import hook, PeftModel's methods, the lm-eval registration.

Subprocesses where the state of ``sys.modules`` / ``sys.meta_path`` at start matters; fake modules
(``monkeypatch.setitem(sys.modules, ...)``) for lm-eval versions that are not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types

import pytest
from adamergex_lm_eval import _hook


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    return proc


def last_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- when_imported
def test_when_imported_runs_after_the_module_executes_and_leaves_no_finder(tmp_path, monkeypatch):
    (tmp_path / "adx_probe_mod.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    _hook.when_imported("adx_probe_mod", lambda module: seen.append(module.VALUE))
    assert _hook._FINDER in sys.meta_path
    import adx_probe_mod  # noqa: F401

    assert seen == [42]
    # Nothing else pending from this test; the lm-eval names may still be (the .pth hook of this environment).
    assert "adx_probe_mod" not in _hook._PENDING
    if not _hook._PENDING:
        assert _hook._FINDER not in sys.meta_path
    # The real loader was wrapped, not modified.
    loader = sys.modules["adx_probe_mod"].__spec__.loader
    assert type(loader).__name__ == "_CallbackLoader"
    assert "exec_module" not in vars(loader._loader)
    # Already imported: at once.
    _hook.when_imported("adx_probe_mod", lambda module: seen.append("again"))
    assert seen == [42, "again"]
    sys.modules.pop("adx_probe_mod")


# --------------------------------------------------------------------------- PeftModel methods
def test_import_is_light_and_waits_for_peft():
    info = last_json(
        run("""
            import json, sys, adamergex_peft
            print(json.dumps({
                "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "peft", "transformers", "lm_eval")),
                "pending": sorted(sys.modules["adamergex_lm_eval._hook"]._PENDING),
            }))
        """)
    )
    assert info["heavy"] == []
    assert "peft.peft_model" in info["pending"]


@pytest.fixture
def fake_peft(tmp_path):
    """A stand-in ``peft`` package (no torch) first on the path: the import machinery is the real one.

    ``PEFT_DEFINES`` set in the environment makes its ``PeftModel`` define that attribute itself, as a
    PEFT release with its own ``merge_crosslingual`` would. (The real peft, both import orders:
    tests/test_config.py.)
    """
    package = tmp_path / "fake_peft" / "peft"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from peft.peft_model import PeftModel\n")
    (package / "peft_model.py").write_text(
        "import os\n"
        "class PeftModel:\n"
        "    pass\n"
        "if os.environ.get('PEFT_DEFINES'):\n"
        "    setattr(PeftModel, os.environ['PEFT_DEFINES'], lambda self, *args: \"peft's own\")\n"
    )
    import os

    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "fake_peft"), *sys.path])}


@pytest.mark.parametrize("order", ["peft_first", "adamergex_first", "adamergex_first_lm_eval_hook_off"])
def test_methods_attached_in_either_import_order(fake_peft, order):
    """Also with the lm-eval part of the hook disabled: ADAMERGEX_LM_EVAL_HOOK concerns lm-eval only."""
    if order.endswith("_off"):
        fake_peft = {**fake_peft, "ADAMERGEX_LM_EVAL_HOOK": "0"}
    first, second = ("import peft", "import adamergex_peft")[:: 1 if order == "peft_first" else -1]
    info = last_json(
        run(
            f"""
            import json, sys
            {first}
            {second}
            from peft import PeftModel
            from adamergex_peft import _peft_hook
            hook = sys.modules["adamergex_lm_eval._hook"]
            print(json.dumps({{
                "fake": PeftModel.__module__ == "peft.peft_model" and "torch" not in sys.modules,
                "methods": [getattr(PeftModel, n) is f for n, f in _peft_hook.METHODS.items()],
                "peft_pending": "peft.peft_model" in hook._PENDING,
            }}))
            """,
            **fake_peft,
        )
    )
    assert info == {"fake": True, "methods": [True, True], "peft_pending": False}


@pytest.mark.parametrize("name", ["merge_crosslingual", "merge_crosslingual_into_base"])
def test_name_clash_with_peft_imported_first_fails_the_import(fake_peft, name):
    proc = run("import peft\nimport adamergex_peft\n", PEFT_DEFINES=name, **fake_peft)
    assert proc.returncode == 1
    assert f"ImportError: adamergex_peft: peft.PeftModel already has an attribute {name!r}" in proc.stderr
    assert "refusing to replace it" in proc.stderr


def test_name_clash_with_peft_imported_later_fails_the_peft_import(fake_peft):
    code = """
        import json, sys
        import adamergex_peft
        try:
            import peft
        except ImportError as err:
            print(json.dumps({"error": str(err), "left": sorted(m for m in sys.modules if m.startswith("peft"))}))
    """
    info = last_json(run(code, PEFT_DEFINES="merge_crosslingual", **fake_peft))
    assert "already has an attribute 'merge_crosslingual' that is not adamergex_peft's" in info["error"]
    assert info["left"] == []  # no half-initialised peft module left behind


def test_our_own_methods_are_not_a_clash(monkeypatch):
    from adamergex_peft import _peft_hook

    cls = type("PeftModel", (), {})
    module = types.SimpleNamespace(PeftModel=cls)
    _peft_hook.attach(module)
    _peft_hook.attach(module)  # e.g. adamergex_peft imported again after a reload
    assert cls.merge_crosslingual is _peft_hook.merge_crosslingual


# --------------------------------------------------------------------------- lm-eval registration
class FakeRegistry:
    def __init__(self):
        self.entries: dict[str, str] = {"hf": "lm_eval.models.huggingface:HFLM"}

    def __contains__(self, name):
        return name in self.entries

    def register(self, name, target):
        self.entries[name] = target


@pytest.fixture
def fake_lm_eval(monkeypatch):
    """An lm-eval with a lazy model registry (0.4.10+), lm_eval.models already imported."""
    package = types.ModuleType("lm_eval")
    package.__path__ = []
    api = types.ModuleType("lm_eval.api")
    api.__path__ = []
    registry = types.ModuleType("lm_eval.api.registry")
    registry.model_registry = FakeRegistry()
    models = types.ModuleType("lm_eval.models")
    package.api, api.registry, package.models = api, registry, models
    for module in (package, api, registry, models):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return registry


def test_register_model_registers_a_lazy_placeholder(fake_lm_eval):
    _hook.register_model()
    assert fake_lm_eval.model_registry.entries == {
        "hf": "lm_eval.models.huggingface:HFLM",
        "adamergex": "adamergex_lm_eval.model:AdaMergeXLM",
    }


@pytest.mark.parametrize("loader", _hook.ENTRY_POINT_LOADERS)
def test_register_model_steps_aside_when_lm_eval_reads_entry_points(fake_lm_eval, loader):
    setattr(fake_lm_eval, loader, lambda *args, **kwargs: None)
    assert _hook.reads_entry_points(fake_lm_eval)
    _hook.register_model()
    assert "adamergex" not in fake_lm_eval.model_registry


def test_entry_point_is_declared_for_lm_eval_models():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    section = text.split('[project.entry-points."lm_eval.models"]', 1)[1].split("\n[", 1)[0]
    entries = [line for line in section.splitlines() if line.strip() and not line.startswith("#")]
    assert entries == [f'adamergex = "{_hook.MODEL_TARGET}"']


def test_installed_lm_eval_gets_the_lazy_placeholder_and_keeps_its_builtins():
    """With the real lm-eval: the .pth hook of this environment (or install()) registers the placeholder."""
    pytest.importorskip("lm_eval")
    info = last_json(
        run("""
            import json, sys
            import adamergex_lm_eval._hook as hook
            hook.install()  # a no-op where the .pth hook already ran; the hook where it did not
            import lm_eval.models
            from lm_eval.api.registry import model_registry
            print(json.dumps({
                "adamergex": dict(model_registry.items()).get("adamergex"),
                "hf": "hf" in model_registry,
                "model_imported": "adamergex_lm_eval.model" in sys.modules,
                "reads_entry_points": hook.reads_entry_points(sys.modules["lm_eval.api.registry"]),
            }))
        """)
    )
    assert info == {
        "adamergex": "adamergex_lm_eval.model:AdaMergeXLM",
        "hf": True,
        "model_imported": False,
        "reads_entry_points": False,  # lm-eval 0.4.13; when this flips, the hook steps aside (test above)
    }


def test_disabled_hook_registers_nothing():
    pytest.importorskip("lm_eval")
    proc = run(
        """
        import sys
        import adamergex_lm_eval._hook as hook
        hook.install()
        import lm_eval.models
        from lm_eval.api.registry import model_registry
        print("adamergex" in model_registry, "lm_eval.models" in hook._PENDING)
        """,
        ADAMERGEX_LM_EVAL_HOOK="0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "False"]
