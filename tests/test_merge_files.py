"""merge_adapter_files and `adamergex merge`: adapter folders in, a standard PEFT adapter folder out."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from adamergex_peft import AdaMergeXConfig, AdaMergeXError, merge_adapter_files
from adamergex_peft import testing as tiny

T, RS, RG = "task", "ref_en", "ref_sw"


def save_adapters(model: PeftModel, root) -> dict[str, str]:
    """Save each adapter of ``model`` to root/<name>; returns name -> folder."""
    model.save_pretrained(str(root))
    folders = {}
    for name in model.peft_config:
        folder = root / name if name != "default" else root
        assert (folder / "adapter_model.safetensors").is_file()
        folders[name] = str(folder)
    return folders


def _three_adapter_dirs(folder, build, spec) -> dict[str, str]:
    """Save the three adapters of ``spec`` (the task one as ``default``, at the folder's root)."""
    model = build(tiny.tiny_llama(), {"default": spec[T], **{k: spec[k] for k in (RS, RG)}})
    folders = save_adapters(model, folder)
    return {T: folders["default"], RS: folders[RS], RG: folders[RG]}


@pytest.fixture
def lora_dirs(tmp_path):
    return _three_adapter_dirs(tmp_path / "lora_adapters", tiny.lora_model, tiny.LLAMA_LORA)


@pytest.fixture
def ia3_dirs(tmp_path):
    return _three_adapter_dirs(tmp_path / "ia3_adapters", tiny.ia3_model, tiny.LLAMA_IA3)


def in_model_result(dirs, config: AdaMergeXConfig) -> dict[str, torch.Tensor]:
    """The same merge done inside a PeftModel, for comparison."""
    base = tiny.tiny_llama()
    model = PeftModel.from_pretrained(base, dirs[T], adapter_name=T)
    model.load_adapter(dirs[RS], adapter_name=RS)
    model.load_adapter(dirs[RG], adapter_name=RG)
    model.merge_crosslingual(
        AdaMergeXConfig(T, RS, RG, t=config.t, method=config.method, lora_strategy=config.lora_strategy), "merged"
    )
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name="merged")


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_files_equal_in_model_merge_and_load_in_plain_peft(kind, tmp_path, request):
    dirs = request.getfixturevalue(f"{kind}_dirs")
    config = AdaMergeXConfig("x", "y", "z", t=0.45)
    out = merge_adapter_files(dirs[T], dirs[RS], dirs[RG], tmp_path / "merged", config)
    assert out == tmp_path / "merged"
    assert sorted(os.listdir(out)) == ["adamergex_config.json", "adapter_config.json", "adapter_model.safetensors"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary folder left

    written = load_file(str(out / "adapter_model.safetensors"))
    expected = in_model_result(dirs, config)
    assert set(written) == set(expected)
    for key in written:
        assert torch.allclose(written[key], expected[key], rtol=1e-6, atol=1e-7), key

    record = json.loads((out / "adamergex_config.json").read_text())
    assert record["config"]["t"] == 0.45 and record["config"]["task_adapter"] == dirs[T]
    for role, folder in (("task_adapter", dirs[T]), ("source_reference_adapter", dirs[RS])):
        digest = hashlib.sha256(open(os.path.join(folder, "adapter_model.safetensors"), "rb").read()).hexdigest()
        assert record["inputs"][role]["weights_sha256"] == digest
    assert record["versions"]["adamergex_peft"]
    assert AdaMergeXConfig.from_pretrained(out).t == 0.45

    # plain PEFT loads it (adamergex_config.json is ignored by PEFT) and applies it
    model = PeftModel.from_pretrained(tiny.tiny_llama(), str(out))
    ids = torch.randint(3, tiny.VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with model.disable_adapter():
            base = model(ids).logits
        assert (model(ids).logits - base).abs().max() > 1e-4


def test_existing_output_needs_overwrite(lora_dirs, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AdaMergeXError, match="exists.*overwrite"):
        merge_adapter_files(lora_dirs[T], lora_dirs[RS], lora_dirs[RG], out)
    assert os.listdir(out) == ["keep.txt"]
    merge_adapter_files(lora_dirs[T], lora_dirs[RS], lora_dirs[RG], out, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and (out / "adapter_model.safetensors").is_file()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_missing_and_corrupt_weights(lora_dirs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(open(os.path.join(lora_dirs[RG], "adapter_config.json")).read())
    with pytest.raises(AdaMergeXError, match="broken.*no adapter_model.safetensors"):
        merge_adapter_files(lora_dirs[T], lora_dirs[RS], broken, tmp_path / "out")
    data = open(os.path.join(lora_dirs[RG], "adapter_model.safetensors"), "rb").read()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(AdaMergeXError, match="broken.*corrupt"):
        merge_adapter_files(lora_dirs[T], lora_dirs[RS], broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_bin_adapters_are_loaded_without_unpickling_code(lora_dirs, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text(open(os.path.join(lora_dirs[RG], "adapter_config.json")).read())
    torch.save(load_file(os.path.join(lora_dirs[RG], "adapter_model.safetensors")), legacy / "adapter_model.bin")
    out = merge_adapter_files(lora_dirs[T], lora_dirs[RS], legacy, tmp_path / "from_bin")
    reference = merge_adapter_files(lora_dirs[T], lora_dirs[RS], lora_dirs[RG], tmp_path / "from_st")
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(reference / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "adapter_config.json").write_text((legacy / "adapter_config.json").read_text())
    (evil / "adapter_model.bin").write_bytes(pickle.dumps(_Exploit()))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(AdaMergeXError, match="evil.*cannot read adapter_model.bin"):
            merge_adapter_files(lora_dirs[T], lora_dirs[RS], evil, tmp_path / "out")
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "out").exists()


def test_adapters_from_another_base_model_are_refused(lora_dirs, tmp_path):
    other = tiny.lora_model(tiny.tiny_llama(hidden=48), {"default": tiny.LLAMA_LORA[RG]})
    other_dir = tmp_path / "other"
    other.save_pretrained(str(other_dir))
    with pytest.raises(
        AdaMergeXError, match=r"module 'model\.layers\.0\.[a-z_.]+'.*differ between adapters.*same base model"
    ):
        merge_adapter_files(lora_dirs[T], lora_dirs[RS], other_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mixed_adapter_types_are_refused(lora_dirs, ia3_dirs, tmp_path):
    with pytest.raises(AdaMergeXError, match="different types.*is LORA.*is IA3"):
        merge_adapter_files(lora_dirs[T], lora_dirs[RS], ia3_dirs[RG], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_in_file_is_refused(lora_dirs, tmp_path):
    sd = load_file(os.path.join(lora_dirs[RS], "adapter_model.safetensors"))
    key = sorted(sd)[0]
    sd[key][0, 0] = float("inf")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(open(os.path.join(lora_dirs[RS], "adapter_config.json")).read())
    save_file(sd, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdaMergeXError, match=f"bad.*{key.split('.lora')[0]}.*NaN/Inf"):
        merge_adapter_files(lora_dirs[T], bad, lora_dirs[RG], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def run_cli(monkeypatch, capsys, caplog):
    """``adamergex ...`` in this process (``cli.main``): exit status, stdout, stderr, warnings logged.

    The real console script and ``python -m adamergex_peft`` run in subprocesses elsewhere
    (test_lm_eval_plugin.py::test_tasks_dir_command, test_output_folders.py concurrent runs); here
    only the argument handling and output matter, so no interpreter start-up per call. What
    ``cli.main`` sets for the process (thread variables, torch threads) is restored afterwards.
    """
    import torch

    from adamergex_peft import cli

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()

    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        caplog.clear()
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse errors
            code = exc.code
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        # A subprocess would print logged warnings to stderr too (cli.main's logging.basicConfig).
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        return SimpleNamespace(returncode=code, stdout=out, stderr=err, logged=logged)

    return run


def test_cli_merge(lora_dirs, tmp_path, run_cli):
    out = tmp_path / "cli_out"
    common = [
        "merge",
        "--task",
        lora_dirs[T],
        "--source-reference",
        lora_dirs[RS],
        "--target-reference",
        lora_dirs[RG],
    ]
    proc = run_cli(*common, "--output", str(out), "--t", "0.45", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    api = merge_adapter_files(
        lora_dirs[T], lora_dirs[RS], lora_dirs[RG], tmp_path / "api", AdaMergeXConfig("a", "b", "c", t=0.45)
    )
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(api / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    # errors: one line, no traceback, exit 2, nothing written
    proc = run_cli(*common, "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "exists" in proc.stderr and proc.logged == []
    proc = run_cli(*common, "--output", str(tmp_path / "fw"), "--lora-strategy", "factorwise", cwd=tmp_path)
    assert proc.returncode == 2 and "one rank and one scaling" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "fw").exists()
    proc = run_cli(*common, "--output", str(tmp_path / "nan"), "--t", "nan", cwd=tmp_path)
    assert proc.returncode == 2 and "finite" in proc.stderr


def test_cli_flags_reach_the_config(lora_dirs, ia3_dirs, tmp_path, run_cli):
    cases = [
        (
            lora_dirs,
            ["--lora-strategy", "svd", "--svd-rank", "3", "--t", "0.3"],
            dict(lora_strategy="svd", svd_rank=3, t=0.3),
        ),
        (
            ia3_dirs,
            ["--method", "task_plus_target", "--ia3-strategy", "power", "--t", "0.6"],
            dict(method="task_plus_target", ia3_strategy="power", t=0.6),
        ),
        (
            ia3_dirs,
            ["--method", "arimerge", "--arimerge-weights", "0.3", "0.7"],
            dict(method="arimerge", arimerge_weights=(0.3, 0.7)),
        ),
    ]
    for i, (dirs, flags, kwargs) in enumerate(cases):
        out = tmp_path / f"cli{i}"
        args = ["merge", "--task", dirs[T], "--source-reference", dirs[RS], "--target-reference", dirs[RG]]
        proc = run_cli(*args, "--output", str(out), *flags, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        api = merge_adapter_files(
            dirs[T], dirs[RS], dirs[RG], tmp_path / f"api{i}", AdaMergeXConfig("a", "b", "c", **kwargs)
        )
        a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(api / "adapter_model.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), flags
        record = json.loads((out / "adamergex_config.json").read_text())["config"]
        for key, value in kwargs.items():
            assert record[key] == (list(value) if isinstance(value, tuple) else value)


def test_failed_write_leaves_nothing(lora_dirs, tmp_path, monkeypatch):
    import safetensors.torch

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter_files(lora_dirs[T], lora_dirs[RS], lora_dirs[RG], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_output_permissions_follow_umask(lora_dirs, tmp_path):
    old = os.umask(0o022)
    try:
        out = merge_adapter_files(lora_dirs[T], lora_dirs[RS], lora_dirs[RG], tmp_path / "out")
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert os.stat(out / "adamergex_config.json").st_mode & 0o777 == 0o644


def test_bad_folders_are_refused(lora_dirs, tmp_path):
    with pytest.raises(AdaMergeXError, match="is not a folder"):
        merge_adapter_files(lora_dirs[T], tmp_path / "missing", lora_dirs[RG], tmp_path / "out")
    with pytest.raises(AdaMergeXError, match="same folder"):
        merge_adapter_files(lora_dirs[T], lora_dirs[RG], lora_dirs[RG], tmp_path / "out")
    parent = os.path.dirname(lora_dirs[RS])
    with pytest.raises(AdaMergeXError, match="is or contains the .* input"):
        merge_adapter_files(lora_dirs[T], lora_dirs[RS], lora_dirs[RG], parent, overwrite=True)
    assert os.path.isdir(lora_dirs[RS]) and not (tmp_path / "out").exists()


def test_dora_folder_is_refused(lora_dirs, tmp_path):
    dora = tiny.lora_model(tiny.tiny_llama(), {"default": {**tiny.LLAMA_LORA[RG], "use_dora": True}})
    dora.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(AdaMergeXError, match="DoRA"):
        merge_adapter_files(lora_dirs[T], lora_dirs[RS], tmp_path / "dora", tmp_path / "out")
    assert not (tmp_path / "out").exists()
