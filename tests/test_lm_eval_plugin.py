"""End-to-end tests of ``lm_eval --model adamergex`` (plugins/adamergex_lm_eval), offline.

The plugin is tested the way a user has it: installed from a wheel, so that the start-up hook
``adamergex_lm_eval.pth`` sits at the root of site-packages. If the interpreter running pytest
already has such an install (CI: ``pip install ".[test,lm-eval]"``, non-editable), it is used
directly; otherwise (an editable development install, or the checkout on ``PYTHONPATH``) the
session builds a wheel of this checkout and installs it, without dependencies, into a throwaway
venv that sees this interpreter's site-packages folders through a ``.pth`` file of plain paths
(so lm-eval, torch, ... come from here, while the editable install's own ``.pth`` files, which
would put the checkout first, are not run). A few seconds; building the wheel needs hatchling,
from PyPI or already installed.

lm-eval runs in subprocesses (``lm_eval ...``) on a tiny random Llama, a tokenizer trained in the
test, adapters saved with non-identity weights, and two tiny local tasks (one multiple_choice,
one generate_until) written to ``tmp_path``, all from :mod:`adamergex_peft.testing`. The
three-way parity check (``--model adamergex`` == ``--model hf,peft=<merged>``) runs in this process
in the default suite and through the real CLI under ``-m slow``.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adamergex_peft import testing

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = REPO / "plugins"
HEAVY_MODULES = ("torch", "transformers", "lm_eval", "adamergex_peft", "peft")
T = 0.7  # the merge coefficient used in the equality tests


# --------------------------------------------------------------------------- installation
def _site_dirs() -> list[str]:
    return [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"]]


def _installed_from_wheel() -> bool:
    """True if this interpreter has the plugin installed non-editably: package and hook file in site-packages."""
    spec = importlib.util.find_spec("adamergex_lm_eval")
    if spec is None or spec.origin is None:
        return False
    site_dir = Path(spec.origin).resolve().parent.parent
    return any(
        Path(d).resolve() == site_dir and (site_dir / "adamergex_lm_eval.pth").is_file()
        for d in _site_dirs()
        if os.path.isdir(d)
    )


_CONSOLE_SCRIPT = """#!{python}
import sys
from {module} import {func}
if __name__ == "__main__":
    sys.exit({func}())
"""


def _write_console_script(bindir: Path, python: Path) -> Path:
    """The ``lm_eval`` console script, as pip writes it into an environment that installs lm-eval."""
    script = bindir / "lm_eval"
    script.write_text(_CONSOLE_SCRIPT.format(python=python, module="lm_eval.__main__", func="cli_evaluate"))
    script.chmod(0o755)
    return script


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory) -> dict[str, Path]:
    """Paths of ``python``, ``lm_eval`` and ``adamergex`` executables with the plugin installed from a wheel."""
    if _installed_from_wheel():
        bindir = Path(sys.executable).parent
        adamergex = shutil.which("adamergex", path=str(bindir))
        assert adamergex, f"the adamergex console script is not in {bindir}"
        lm_eval = shutil.which("lm_eval", path=str(bindir))
        if lm_eval is None:  # lm-eval comes from a parent environment (venv with --system-site-packages)
            lm_eval = _write_console_script(tmp_path_factory.mktemp("bin"), Path(sys.executable))
        return {"python": Path(sys.executable), "lm_eval": Path(lm_eval), "adamergex": Path(adamergex)}

    work = tmp_path_factory.mktemp("plugin_install")
    wheel_dir = work / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(wheel_dir)]
    if importlib.util.find_spec("hatchling") is not None:
        build.append("--no-build-isolation")
    subprocess.run(build, check=True, cwd=work, capture_output=True, text=True)
    (wheel,) = wheel_dir.glob("adamergex_peft-*.whl")
    venv = work / "venv"
    # Not --system-site-packages: made from a venv's interpreter, that would see the base Python's
    # site-packages, not this environment's (where lm-eval is).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    child_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Plain paths: appended after the venv's own site-packages, their .pth files are not run.
    Path(child_site, "_parent_site_packages.pth").write_text("".join(d + "\n" for d in _parent_site_dirs()))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    lm_eval = _write_console_script(venv / "bin", python)
    return {"python": python, "lm_eval": lm_eval, "adamergex": venv / "bin" / "adamergex"}


def _parent_site_dirs() -> list[str]:
    """This interpreter's site-packages folders (its venv's and any it inherits), in ``sys.path`` order."""
    site_dirs = {os.path.realpath(d) for d in _site_dirs() if os.path.isdir(d)}
    return [p for p in dict.fromkeys(sys.path) if p and os.path.realpath(p) in site_dirs]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ADAMERGEX_LM_EVAL_HOOK")}
    # The offline variables come from conftest.py (inherited through os.environ).
    env.update(HF_DATASETS_CACHE=str(tmp_path / "hf_datasets_cache"), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _run(cmd: list, cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-4000:]}")
    return proc


# --------------------------------------------------------------------------- tiny model, adapters, tasks
TEXT = [
    "the cat sat on the mat because it was warm",
    "a dog runs in the park and the man walks",
    "question: what is two plus two? answer: four",
    "premise: the man fell. what was the cause? he slipped on the ice",
    "paka alikaa kwenye mkeka kwa sababu ulikuwa na joto",
    "mbwa anakimbia kwenye bustani na mtu anatembea",
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 32) and a BPE tokenizer trained on a few lines, in one folder."""
    tokenizer = testing.bpe_tokenizer(TEXT, vocab_size=320)
    model = testing.tiny_llama(tokenizer=tokenizer, kv_heads=None, max_positions=256)
    return testing.save_model(model, tokenizer, tmp_path_factory.mktemp("tiny_llama"))


def _save_adapter(base_dir: Path, peft_type: str, seed: int, out: Path) -> Path:
    """A random adapter: LoRA r=4 on q, v, down; (IA)^3 on k, v, down (positive vectors, not ones)."""
    return testing.save_adapter(base_dir, peft_type, seed, out)


@pytest.fixture(scope="session", params=["lora", "ia3"])
def adapters(request, tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Task, source-reference and target-reference adapters (non-identity) for the tiny model."""
    folder = tmp_path_factory.mktemp(f"adapters_{request.param}")
    return {
        "peft_type": request.param,
        "task_adapter": _save_adapter(tiny_model, request.param, 1, folder / "task_en"),
        "source_reference_adapter": _save_adapter(tiny_model, request.param, 2, folder / "ref_en"),
        "target_reference_adapter": _save_adapter(tiny_model, request.param, 3, folder / "ref_sw"),
    }


MC_DOCS = [
    ("the cat sat", "on the mat", "in the park", 0),
    ("a dog runs", "in the park", "on the mat", 0),
    ("the man fell", "he slipped", "he sat", 1),
    ("paka alikaa", "kwenye mkeka", "mbwa anakimbia", 0),
    ("what is two plus two", "four", "the cat", 0),
    ("mbwa anakimbia", "kwenye bustani", "kwa sababu", 1),
]
GEN_DOCS = [
    ("what is two plus two?", "four"),
    ("the cat sat on the", "mat"),
    ("a dog runs in the", "park"),
    ("paka alikaa kwenye", "mkeka"),
]


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory) -> Path:
    """A task folder with ``tiny_mc`` (multiple_choice, acc) and ``tiny_gen`` (generate_until, exact_match)."""
    folder = tmp_path_factory.mktemp("tiny_tasks")
    mc = [{"premise": p, "choice1": a, "choice2": b, "label": label} for p, a, b, label in MC_DOCS]
    testing.write_jsonl(mc, folder / "mc.jsonl")
    testing.write_jsonl([{"question": q, "answer": a} for q, a in GEN_DOCS], folder / "gen.jsonl")
    testing.write_task_yaml(
        folder,
        "tiny_mc",
        folder / "mc.jsonl",
        doc_to_text="{{premise}} because",
        doc_to_choice="{{[choice1, choice2]}}",
        doc_to_target="label",
    )
    testing.write_task_yaml(
        folder,
        "tiny_gen",
        folder / "gen.jsonl",
        output_type="generate_until",
        doc_to_text="question: {{question}} answer:",
        doc_to_target=" {{answer}}",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        metrics=["exact_match"],
    )
    return folder


def _model_args(**kwargs) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


def _lm_eval(
    plugin_env,
    tmp_path: Path,
    model: str,
    model_args: str,
    tasks: str,
    include_path: Path | None,
    name: str,
    launcher: list | None = None,
    **env,
) -> dict:
    """Run ``lm_eval`` in a subprocess; return the results JSON plus ``samples`` (task -> list of records).

    ``launcher`` replaces the ``lm_eval`` command (e.g. ``[python, "-m", "adamergex_lm_eval"]``).
    """
    out = tmp_path / f"out_{name}"
    cmd = [*(launcher or [plugin_env["lm_eval"]]), "--model", model, "--model_args", model_args, "--tasks", tasks]
    cmd += ["--device", "cpu", "--batch_size", "2", "--output_path", out, "--log_samples"]
    if include_path is not None:
        cmd += ["--include_path", include_path]
    env.setdefault("HF_DATASETS_CACHE", str(tmp_path / f"hf_datasets_cache_{name}"))
    _run(cmd, cwd=tmp_path, env=_env(tmp_path, **env))
    return _read_results(out)


def _read_results(out: Path) -> dict:
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    results = json.loads(Path(results_file).read_text())
    results["samples"] = {}
    for path in glob.glob(str(out / "*" / "samples_*.jsonl")):
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        task = Path(path).name[len("samples_") :].rsplit("_", 1)[0]  # samples_<task>_<timestamp>.jsonl
        results["samples"][task] = sorted(records, key=lambda r: r["doc_id"])
    return results


def _scores(results: dict) -> dict:
    return {
        task: {k: v for k, v in metrics.items() if not k.endswith("_stderr,none") and k != "alias"}
        for task, metrics in results["results"].items()
    }


def _responses(results: dict, task: str) -> list:
    """Per-document model outputs: loglikelihoods for multiple_choice, generated text for generate_until."""
    return [record["filtered_resps"] for record in results["samples"][task]]


# --------------------------------------------------------------------------- start-up cost and registration
def test_python_start_imports_nothing_heavy(plugin_env, tmp_path):
    """`python -c pass` with the hook installed imports only the stdlib hook, nothing heavy."""
    code = "import json, sys; print(json.dumps(sorted(sys.modules)))"
    proc = _run([plugin_env["python"], "-c", code], cwd=tmp_path, env=_env(tmp_path))
    modules = set(json.loads(proc.stdout))
    assert "adamergex_lm_eval._hook" in modules, "the start-up hook is not active: the check below would be vacuous"
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY_MODULES)
    assert heavy == []


def test_registry_keeps_builtins_and_registers_adamergex_lazily(plugin_env, tmp_path):
    code = textwrap.dedent("""\
        import json, sys
        from lm_eval.api.registry import get_model, model_registry  # registry first, as lm_eval's CLI does
        hf = get_model("hf")  # imports lm_eval.models (registry empty) -> the hook registers adamergex
        dummy = get_model("dummy")
        placeholder = dict(model_registry.items())["adamergex"]
        plugin_loaded_before = "adamergex_lm_eval.model" in sys.modules
        cls = get_model("adamergex")
        print(json.dumps({
            "hf": hf.__name__, "dummy": dummy.__name__, "placeholder": placeholder,
            "plugin_loaded_before": plugin_loaded_before, "cls": f"{cls.__module__}.{cls.__name__}",
            "is_hflm": issubclass(cls, hf), "n_models": len(model_registry),
        }))
    """)
    proc = _run([plugin_env["python"], "-c", code], cwd=tmp_path, env=_env(tmp_path))
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["hf"] == "HFLM" and info["dummy"] == "DummyLM"
    assert info["placeholder"] == "adamergex_lm_eval.model:AdaMergeXLM"
    assert info["plugin_loaded_before"] is False  # lazy: nothing imported until --model adamergex is asked for
    assert info["cls"] == "adamergex_lm_eval.model.AdaMergeXLM" and info["is_hflm"]
    assert info["n_models"] > 30  # every built-in is still there


def test_hook_can_be_disabled(plugin_env, tmp_path):
    code = "import lm_eval.models, json; from lm_eval.api.registry import model_registry; print('adamergex' in model_registry)"
    proc = _run([plugin_env["python"], "-c", code], cwd=tmp_path, env=_env(tmp_path, ADAMERGEX_LM_EVAL_HOOK="0"))
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_tasks_dir_command(plugin_env, tmp_path):
    """`adamergex tasks-dir` prints the task folder shipped inside the installed package."""
    proc = _run([plugin_env["adamergex"], "tasks-dir"], cwd=tmp_path, env=_env(tmp_path))
    folder = Path(proc.stdout.strip())
    assert folder.name == "lm_eval_tasks" and folder.parent.name == "adamergex_peft"
    assert (folder.parent.parent / "adamergex_lm_eval.pth").is_file()  # site-packages of the wheel install
    source = REPO / "lm_eval_tasks"
    assert sorted(p.relative_to(folder) for p in folder.rglob("*.yaml")) == sorted(
        p.relative_to(source) for p in source.rglob("*.yaml")
    )
    assert len(list(folder.rglob("adamergex_xcopa_mc_sw.yaml"))) == 1


def test_tasks_dir_falls_back_to_source_checkout():
    import adamergex_peft
    from adamergex_peft.commands.tasks_dir import find_tasks_dir

    package_dir = Path(adamergex_peft.__file__).resolve().parent
    if (package_dir.parent / "pyproject.toml").is_file():  # a source checkout (editable install)
        assert find_tasks_dir() == package_dir.parent / "lm_eval_tasks"
    else:  # an installed wheel
        assert find_tasks_dir() == package_dir / "lm_eval_tasks"


def test_task_manager_indexes_adamergex_tasks_only_with_the_defaults(plugin_env, tmp_path, tiny_tasks):
    """The hook adds the task folder to TaskManager(include_defaults=True) (what `lm_eval` builds), once."""
    code = textwrap.dedent(f"""\
        import importlib.util, json, logging, os, sys
        # The installed package's task folder, found without importing the package (what `adamergex
        # tasks-dir` prints: test_tasks_dir_command).
        tasks_dir = os.path.join(importlib.util.find_spec("adamergex_peft").submodule_search_locations[0], "lm_eval_tasks")
        assert os.path.isdir(tasks_dir), tasks_dir
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())
        logging.getLogger("lm_eval").addHandler(Keep())
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        from lm_eval.tasks import TaskManager
        # The folder is also passed explicitly (the documented --include_path route): no duplicate.
        with_defaults = TaskManager(include_path=[tasks_dir, "{tiny_tasks}"])
        without = TaskManager(include_defaults=False, include_path="{tiny_tasks}")
        print(json.dumps({{
            "with_defaults": [t for t in ("adamergex_xcopa_mc_sw", "adamergex", "tiny_mc", "hellaswag")
                              if t in with_defaults.all_tasks],
            "without": [t for t in ("adamergex_xcopa_mc_sw", "tiny_mc") if t in without.all_tasks],
            "overrides": [m for m in records if "overrides existing task" in m],
            "adamergex_peft_imported": "adamergex_peft" in sys.modules,
        }}))
    """)
    proc = _run([plugin_env["python"], "-c", code], cwd=tmp_path, env=_env(tmp_path))
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["with_defaults"] == ["adamergex_xcopa_mc_sw", "adamergex", "tiny_mc", "hellaswag"]
    assert info["without"] == ["tiny_mc"]
    assert info["overrides"] == []
    assert info["adamergex_peft_imported"] is False  # the hook finds the folder without running the library


# --------------------------------------------------------------------------- argument errors
@pytest.fixture
def plugin_module(monkeypatch):
    """The plugin's model module, imported in this process (from the checkout when not installed)."""
    if importlib.util.find_spec("adamergex_lm_eval") is None:
        monkeypatch.syspath_prepend(str(PLUGIN_SOURCE))
    import adamergex_lm_eval.model

    return adamergex_lm_eval.model


@pytest.fixture(scope="session")
def lora_adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora_for_errors")
    return {
        "task_adapter": _save_adapter(tiny_model, "lora", 1, folder / "task"),
        "source_reference_adapter": _save_adapter(tiny_model, "lora", 2, folder / "src"),
        "target_reference_adapter": _save_adapter(tiny_model, "lora", 3, folder / "tgt"),
        "ia3": _save_adapter(tiny_model, "ia3", 4, folder / "ia3"),
    }


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"pretrained": None}, "pretrained"),
        ({"task_adapter": None}, "task_adapter"),
        ({"source_reference_adapter": ""}, "source_reference_adapter"),
        ({"target_reference_adapter": None}, "target_reference_adapter"),
        ({"t": "abc"}, "t"),
        ({"t": "nan"}, "t"),
        ({"method": "bogus"}, "method"),
        ({"lora_strategy": "dense"}, "lora_strategy"),
        ({"ia3_strategy": "cubic"}, "ia3_strategy"),
        ({"svd_rank": "x"}, "svd_rank"),
        ({"svd_rank": 0}, "svd_rank"),
        ({"arimerge_weights": "0.5"}, "arimerge_weights"),
        ({"arimerge_weights": "a:b"}, "arimerge_weights"),
        ({"merge_into_base": "maybe"}, "merge_into_base"),
        ({"peft": "some/adapter"}, "peft"),
        ({"delta": "some/delta"}, "delta"),
        ({"task_adapter": "NOT_A_FOLDER"}, "task_adapter"),
        ({"target_reference_adapter": "EMPTY_FOLDER"}, "target_reference_adapter"),
        ({"target_reference_adapter": "IA3"}, "target_reference_adapter"),
        ({"target_reference_adapter": "SOURCE"}, "target_reference_adapter"),
        ({"task_adapter": "SOURCE"}, "task_adapter"),
    ],
)
def test_argument_errors_are_one_line_and_name_the_argument(
    plugin_module, tiny_model, lora_adapters, tmp_path, change, argument
):
    kwargs = {
        "pretrained": str(tiny_model),
        "task_adapter": str(lora_adapters["task_adapter"]),
        "source_reference_adapter": str(lora_adapters["source_reference_adapter"]),
        "target_reference_adapter": str(lora_adapters["target_reference_adapter"]),
        "device": "cpu",
    }
    (tmp_path / "empty").mkdir()
    placeholders = {
        "NOT_A_FOLDER": str(tmp_path / "no_such_adapter"),
        "EMPTY_FOLDER": str(tmp_path / "empty"),
        "IA3": str(lora_adapters["ia3"]),
        "SOURCE": str(lora_adapters["source_reference_adapter"]) + "/",
    }
    kwargs.update({k: placeholders.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    with pytest.raises(ValueError) as excinfo:
        plugin_module.AdaMergeXLM(**kwargs)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"adamergex model_args: {argument}: "), message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.5:0.5", (0.5, 0.5)), ("0.3:0.7", (0.3, 0.7)), ((1, 0), (1.0, 0.0)), ("1:-1", (1.0, -1.0))],
)
def test_parse_arimerge_weights(plugin_module, text, expected):
    assert plugin_module.parse_arimerge_weights(text) == expected


def test_cli_argument_error_names_the_argument(plugin_module, lm_eval_cli, tiny_model, tiny_tasks, tmp_path):
    """Through lm-eval's CLI: the error (the last line a user sees) names every missing argument.

    In this process (``cli_evaluate``; the plugin registered by importing it): the console script
    with the installed start-up hook runs in test_lm_eval_adamergex_on_a_packaged_task_without_include_path.
    """
    args = ["--model", "adamergex", "--model_args", f"pretrained={tiny_model},t=0.5"]
    args += ["--tasks", "tiny_mc", "--include_path", tiny_tasks, "--device", "cpu"]
    with pytest.raises(ValueError) as excinfo:
        lm_eval_cli(*args, cwd=tmp_path)
    assert type(excinfo.value) is ValueError  # printed as "ValueError: ..." by the real command
    missing = "task_adapter, source_reference_adapter, target_reference_adapter"  # all of them, as argparse does
    assert str(excinfo.value).startswith(f"adamergex model_args: {missing}: required"), str(excinfo.value)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="session")
def base_results(plugin_env, tiny_model, tiny_tasks, tmp_path_factory) -> dict:
    """`lm_eval --model hf` on the bare base model (also shows built-in models work with the plugin installed)."""
    tmp = tmp_path_factory.mktemp("run_base")
    return _lm_eval(plugin_env, tmp, "hf", f"pretrained={tiny_model}", "tiny_mc,tiny_gen", tiny_tasks, "base")


def _assert_parity(via_hf: dict, into_base: dict, as_adapter: dict, base: dict) -> None:
    """adamergex merged into the base and as a PEFT adapter score like hf with the merged adapter."""
    assert _scores(into_base) == _scores(via_hf)
    assert _scores(as_adapter) == _scores(via_hf)
    # Same per-document outputs: bit-identical for the same adapter, within float rounding when merged.
    assert _responses(as_adapter, "tiny_mc") == _responses(via_hf, "tiny_mc")
    assert _responses(as_adapter, "tiny_gen") == _responses(via_hf, "tiny_gen")
    assert _responses(into_base, "tiny_gen") == _responses(via_hf, "tiny_gen")
    ll_hf = [float(x[0]) for doc in _responses(via_hf, "tiny_mc") for x in doc]
    ll_merged = [float(x[0]) for doc in _responses(into_base, "tiny_mc") for x in doc]
    assert ll_merged == pytest.approx(ll_hf, rel=1e-4, abs=1e-4)
    # ... and the merged adapter really changed the model (the comparison above is not vacuous).
    ll_base = [float(x[0]) for doc in _responses(base, "tiny_mc") for x in doc]
    assert max(abs(a - b) for a, b in zip(ll_base, ll_hf)) > 1e-3


def test_adamergex_lm_matches_hf_peft_with_merged_adapter_in_process(
    plugin_module, tiny_model, adapters, tiny_tasks, tmp_path
):
    """The parity check of the CLI test below, on lm-eval's ``simple_evaluate`` in this process (fast).

    The merged adapter is written by ``merge_adapter_files`` with the same settings (LoRA: the
    defaults; (IA)^3: the non-default ia3_strategy=power, passed as a model argument).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from adamergex_peft import AdaMergeXConfig, merge_adapter_files

    names = ("task_adapter", "source_reference_adapter", "target_reference_adapter")
    paths = {k: str(adapters[k]) for k in names}
    settings = {"ia3_strategy": "power"} if adapters["peft_type"] == "ia3" else {}
    merged = merge_adapter_files(
        *paths.values(), tmp_path / "merged", config=AdaMergeXConfig(**paths, t=T, **settings)
    )
    task_manager = TaskManager(include_path=str(tiny_tasks), include_defaults=False)

    def evaluate(lm) -> dict:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=["tiny_mc", "tiny_gen"], task_manager=task_manager, log_samples=True
        )
        results["samples"] = {k: sorted(v, key=lambda r: r["doc_id"]) for k, v in results["samples"].items()}
        return results

    common = {"pretrained": str(tiny_model), "device": "cpu", "batch_size": 2}
    via_hf = evaluate(HFLM(**common, peft=str(merged)))
    into_base = evaluate(plugin_module.AdaMergeXLM(**common, **paths, t=T, **settings))
    as_adapter = evaluate(plugin_module.AdaMergeXLM(**common, **paths, t=T, merge_into_base=False, **settings))
    base = evaluate(HFLM(**common))
    _assert_parity(via_hf, into_base, as_adapter, base)
    # The AdaMergeX settings are recorded in the results.
    info = into_base["config"]["adamergex"]
    assert info["config"]["t"] == T and info["merge_into_base"] is True
    assert info["config"]["ia3_strategy"] == settings.get("ia3_strategy", "linear")
    assert info["peft_type"] == adapters["peft_type"].upper()
    assert as_adapter["config"]["adamergex"]["merge_into_base"] is False


@pytest.mark.slow
def test_lm_eval_adamergex_matches_hf_peft_with_merged_adapter(
    plugin_env, tiny_model, adapters, tiny_tasks, base_results, tmp_path
):
    """`--model adamergex` (merged into the base, or as a PEFT adapter) scores exactly like `--model hf,peft=<merged>`.

    Through the real CLI (three lm_eval subprocesses per adapter type, ~1.5 min each: slow; the
    same parity runs in process in the default suite). The merged adapter is written by the
    installed `adamergex merge` with the same settings (LoRA: the defaults; (IA)^3: the
    non-default ia3_strategy=power, passed through model_args).
    """
    task, src, tgt = (adapters[k] for k in ("task_adapter", "source_reference_adapter", "target_reference_adapter"))
    settings = {"ia3_strategy": "power"} if adapters["peft_type"] == "ia3" else {}
    merged = tmp_path / "merged"
    cmd = [plugin_env["adamergex"], "merge", "--task", task, "--source-reference", src, "--target-reference", tgt]
    cmd += ["--output", merged, "--t", str(T)]
    for key, value in settings.items():
        cmd += [f"--{key.replace('_', '-')}", value]
    _run(cmd, cwd=tmp_path, env=_env(tmp_path))
    tasks = "tiny_mc,tiny_gen"
    common = {"pretrained": tiny_model, "task_adapter": task, "source_reference_adapter": src}
    common.update(target_reference_adapter=tgt, t=T, **settings)

    runs = {
        "via_hf": dict(model="hf", model_args=f"pretrained={tiny_model},peft={merged}"),
        "into_base": dict(model="adamergex", model_args=_model_args(**common)),
        # merge_into_base=false through the documented fallback launcher, with the start-up hook switched off.
        "as_adapter": dict(
            model="adamergex",
            model_args=_model_args(**common, merge_into_base="false"),
            launcher=[plugin_env["python"], "-m", "adamergex_lm_eval"],
            ADAMERGEX_LM_EVAL_HOOK="0",
        ),
    }
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:  # independent subprocesses: run them side by side
        futures = {
            name: pool.submit(_lm_eval, plugin_env, tmp_path, tasks=tasks, include_path=tiny_tasks, name=name, **kw)
            for name, kw in runs.items()
        }
        via_hf, into_base, as_adapter = (futures[name].result() for name in runs)

    _assert_parity(via_hf, into_base, as_adapter, base_results)
    # The AdaMergeX settings are recorded in the results JSON.
    assert into_base["config"]["model"] == "adamergex"
    assert into_base["config"]["adamergex"]["config"]["t"] == T
    assert into_base["config"]["adamergex"]["config"]["ia3_strategy"] == settings.get("ia3_strategy", "linear")
    assert into_base["config"]["adamergex"]["peft_type"] == adapters["peft_type"].upper()


def test_lm_eval_adamergex_on_a_packaged_task_without_include_path(plugin_env, tiny_model, lora_adapters, tmp_path):
    """A real adamergex_* task (generation and log-likelihood variants) from local data, no --include_path."""
    data = tmp_path / "data" / "xcopa" / "sw"
    data.mkdir(parents=True)
    docs = [
        {"premise": "paka alikaa kwenye mkeka", "choice1": "ulikuwa na joto", "choice2": "mbwa anakimbia",
         "question": "cause", "label": 0, "idx": 0},
        {"premise": "mbwa anakimbia", "choice1": "kwenye bustani", "choice2": "kwa sababu",
         "question": "effect", "label": 0, "idx": 1},
        {"premise": "mtu anatembea", "choice1": "paka alikaa", "choice2": "kwenye bustani",
         "question": "effect", "label": 1, "idx": 2},
    ]  # fmt: skip
    (data / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    args = _model_args(
        pretrained=tiny_model,
        task_adapter=lora_adapters["task_adapter"],
        source_reference_adapter=lora_adapters["source_reference_adapter"],
        target_reference_adapter=lora_adapters["target_reference_adapter"],
        t=1,
    )
    results = _lm_eval(
        plugin_env,
        tmp_path,
        "adamergex",
        args,
        "adamergex_xcopa_sw,adamergex_xcopa_mc_sw",
        None,
        "packaged",
        ADAMERGEX_DATA_DIR=str(tmp_path / "data"),
    )
    assert results["results"]["adamergex_xcopa_mc_sw"]["sample_len"] == 3
    assert results["results"]["adamergex_xcopa_sw"]["sample_len"] == 3
    prompts = [r["arguments"]["gen_args_0"]["arg_0"] for r in results["samples"]["adamergex_xcopa_mc_sw"]]
    assert "paka alikaa kwenye mkeka" in prompts[0]
    assert results["config"]["adamergex"]["config"]["t"] == 1.0


@pytest.mark.slow
def test_two_process_launch(plugin_env, tiny_model, lora_adapters, tiny_tasks, tmp_path):
    """`lm_eval --model adamergex` under a 2-process distributed launch (torchrun, as `accelerate launch` uses).

    On CPU, HFLM does not shard the data (its data parallelism needs more than one GPU): every
    process evaluates everything. This checks that the adapters are loaded and merged in each
    process and that the scores equal a single-process run; the GPU sharding itself is HFLM's.
    """
    args = _model_args(
        pretrained=tiny_model,
        task_adapter=lora_adapters["task_adapter"],
        source_reference_adapter=lora_adapters["source_reference_adapter"],
        target_reference_adapter=lora_adapters["target_reference_adapter"],
        t=T,
    )
    single = _lm_eval(plugin_env, tmp_path, "adamergex", args, "tiny_mc", tiny_tasks, "single")
    out = tmp_path / "out_two"
    cmd = [plugin_env["python"], "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    cmd += ["-m", "lm_eval", "--model", "adamergex", "--model_args", args, "--tasks", "tiny_mc"]
    cmd += ["--include_path", tiny_tasks, "--batch_size", "2", "--output_path", out]
    proc = _run(cmd, cwd=tmp_path, env=_env(tmp_path))
    assert proc.stderr.count("Merged the AdaMergeX update") == 2  # one merge per process
    results_files = glob.glob(str(out / "*" / "results_*.json"))
    assert results_files
    for path in results_files:
        assert _scores(json.loads(Path(path).read_text())) == _scores(single)


@pytest.mark.parametrize("merge_into_base", [True, False])
def test_model_object_and_merge_modes_in_process(plugin_module, tiny_model, lora_adapters, tmp_path, merge_into_base):
    """`pretrained` may be a model object; merge_into_base picks a plain model or a PeftModel with one adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from adamergex_peft import AdaMergeXConfig, merge_adapter_files

    names = ("task_adapter", "source_reference_adapter", "target_reference_adapter")
    task, src, tgt = (lora_adapters[k] for k in names)
    cfg = AdaMergeXConfig(
        task_adapter=str(task), source_reference_adapter=str(src), target_reference_adapter=str(tgt), t=T
    )
    merged = merge_adapter_files(task, src, tgt, tmp_path / "merged", config=cfg)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lm = plugin_module.AdaMergeXLM(
        pretrained=LlamaForCausalLM.from_pretrained(tiny_model),
        tokenizer=tokenizer,
        task_adapter=str(task),
        source_reference_adapter=str(src),
        target_reference_adapter=str(tgt),
        t=T,
        merge_into_base=merge_into_base,
        batch_size=1,
    )
    if merge_into_base:
        assert type(lm.model) is LlamaForCausalLM  # PEFT unloaded: base-model speed
    else:
        assert isinstance(lm.model, PeftModel)
        assert list(lm.model.peft_config) == [plugin_module.MERGED_ADAPTER_NAME]  # the three inputs are deleted
        assert lm.model.active_adapters == [plugin_module.MERGED_ADAPTER_NAME]
    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model), merged).eval()
    ids = tokenizer("paka alikaa kwenye mkeka because the cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).logits
        got = lm.model(ids).logits
        base = LlamaForCausalLM.from_pretrained(tiny_model)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (base - expected).abs().max() > 1e-3
