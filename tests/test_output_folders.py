"""Output folders of merge_adapter_files / `adamergex merge`: never delete what is not ours, never leave debris."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

import adamergex_peft.atomic as atomic
import adamergex_peft.files as files
from adamergex_peft import AdaMergeXError, merge_adapter_files

T, RS, RG = "task", "ref_en", "ref_sw"
FILES = ["adamergex_config.json", "adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    model = tiny.lora_model(
        tiny.tiny_llama(), {"default": tiny.LLAMA_LORA[T], **{k: tiny.LLAMA_LORA[k] for k in (RS, RG)}}
    )
    model.save_pretrained(str(root))
    return {T: str(root), RS: str(root / RS), RG: str(root / RG)}


@pytest.fixture
def work(tmp_path) -> Path:
    """An empty folder to write outputs into (the adapters live elsewhere)."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def tree(path: Path) -> dict[str, bytes | None]:
    """Everything under ``path`` (relative name -> bytes, None for folders; symlinks by target)."""
    out: dict[str, bytes | None] = {}
    for root, dirs, names in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path)] = None
        for n in names:
            full = os.path.join(root, n)
            out[os.path.relpath(full, path)] = (
                os.readlink(full).encode() if os.path.islink(full) else Path(full).read_bytes()
            )
    return out


def merge(adapters, out, **kw):
    return merge_adapter_files(adapters[T], adapters[RS], adapters[RG], out, **kw)


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def no_debris(folder: Path) -> None:
    assert [p for p in os.listdir(folder) if p.startswith(".amx-")] == []


@pytest.fixture(params=["renameat2", "mkdir_fallback"])
def rename_mode(request, monkeypatch):
    if request.param == "mkdir_fallback":
        monkeypatch.setattr(atomic, "_renameat2", lambda: None)
    elif atomic._renameat2() is None:
        pytest.skip("renameat2 is not available on this platform (the fallback is tested)")
    return request.param


# -------------------------------------------------------------------------- create-if-absent publishing
@pytest.mark.parametrize("intruder", ["empty_folder", "folder_with_file", "file"])
def test_output_appearing_during_the_merge_is_never_replaced(adapters, work, monkeypatch, rename_mode, intruder):
    out = work / "merged"
    real = files._write_adapter

    def write_then_intrude(folder, result, record):
        real(folder, result, record)
        if intruder == "file":
            out.write_text("someone else's file")
        else:
            out.mkdir()
            if intruder == "folder_with_file":
                (out / "theirs.txt").write_text("someone else's result")

    monkeypatch.setattr(files, "_write_adapter", write_then_intrude)
    before_inputs = {role: tree(Path(d)) for role, d in adapters.items() if role != T}
    with pytest.raises(AdaMergeXError) as err:
        merge(adapters, out)
    message = one_line(err)
    assert f"output folder {str(out)!r} appeared while this run was writing" in message, message
    if intruder == "file":
        assert out.read_text() == "someone else's file"
    else:
        assert tree(out) == ({} if intruder == "empty_folder" else {"theirs.txt": b"someone else's result"})
    assert sorted(os.listdir(work)) == ["merged"]  # no temporary folder left
    assert {role: tree(Path(d)) for role, d in adapters.items() if role != T} == before_inputs


def test_two_concurrent_cli_runs_one_wins_one_exits_2(adapters, work):
    out = work / "merged"
    cmd = [sys.executable, "-m", "adamergex_peft", "merge", "--task", adapters[T], "--source-reference"]
    cmd += [adapters[RS], "--target-reference", adapters[RG], "--output", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2).strip()
    assert "\n" not in loser and str(out) in loser, loser
    # the CLI also writes the model card (README.md) inside the same atomic publish
    assert sorted(os.listdir(work)) == ["merged"] and sorted(os.listdir(out)) == sorted([*FILES, "README.md"])


# ------------------------------------------------------------------------------------- temporary names
def test_long_output_name_works_and_temp_names_are_short(adapters, work, monkeypatch):
    out = work / ("m" * 250)
    seen = []
    real = files._write_adapter
    monkeypatch.setattr(files, "_write_adapter", lambda f, r, rec: seen.append(f.name) or real(f, r, rec))
    merge(adapters, out)
    assert sorted(os.listdir(out)) == FILES
    assert len(seen) == 1 and seen[0].startswith(".amx-") and seen[0].endswith(".tmp") and len(seen[0]) <= 30
    assert sorted(os.listdir(work)) == [out.name]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_of_this_output_are_removed_others_kept(adapters, work, caplog):
    out = work / "merged"
    tag, dead = atomic._tag(out.name), _dead_pid()
    ours_dead = work / f".amx-{tag}-{dead}-abcd.tmp"
    ours_live = work / f".amx-{tag}-{os.getppid()}-abcd.tmp"  # a live process (pytest's parent)
    other_output = work / f".amx-{atomic._tag('other')}-{dead}-abcd.tmp"
    old_kept = work / f".amx-{tag}-{dead}-beef.old"
    unrelated = work / f".merged.tmp-{dead}"
    for folder in (ours_dead, ours_live, other_output, old_kept, unrelated):
        folder.mkdir()
        (folder / "data").write_text("x")
    with caplog.at_level("INFO", logger="adamergex_peft.atomic"):
        merge(adapters, out)
    assert not ours_dead.exists()
    assert all((f / "data").read_text() == "x" for f in (ours_live, other_output, old_kept, unrelated))
    assert str(ours_dead) in caplog.text and str(old_kept) in caplog.text
    assert sorted(os.listdir(out)) == FILES


# ------------------------------------------------------------------------------------ overwrite swap
def test_overwrite_replaces_and_leaves_nothing_behind(adapters, work):
    out = work / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    merge(adapters, out, overwrite=True)
    assert sorted(os.listdir(out)) == FILES
    assert sorted(os.listdir(work)) == ["merged"]


_CRASH = textwrap.dedent(
    """
    import os, sys
    import adamergex_peft.atomic as atomic
    from adamergex_peft import merge_adapter_files
    where = sys.argv[1]
    if where == "between_renames":
        real = atomic.rename_noreplace
        def crash(src, dst):
            if str(src).endswith(".tmp"):
                os._exit(9)
            real(src, dst)
        atomic.rename_noreplace = crash
    else:
        def crash(path):
            os._exit(9)
        atomic._remove = crash
    merge_adapter_files(*sys.argv[2:5], sys.argv[5], overwrite=True)
    """
)


@pytest.mark.parametrize("where", ["between_renames", "before_removing_old"])
def test_interrupted_overwrite_is_repaired_by_the_next_run(adapters, work, where):
    out = work / "merged"
    out.mkdir()
    (out / "previous.txt").write_text("the previous result")
    args = [sys.executable, "-c", _CRASH, where, adapters[T], adapters[RS], adapters[RG], str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert (work / f".amx-{atomic._tag(out.name)}.swap").exists()
    if where == "between_renames":
        assert not out.exists()  # the crash window: the next run restores the previous output
        with pytest.raises(AdaMergeXError, match="exists; pass overwrite=True"):
            merge(adapters, out)
        assert tree(out) == {"previous.txt": b"the previous result"}
    else:
        assert sorted(os.listdir(out)) == FILES  # the swap was done: the next run finishes it
        with pytest.raises(AdaMergeXError, match="exists; pass overwrite=True"):
            merge(adapters, out)
        assert sorted(os.listdir(out)) == FILES
    assert sorted(os.listdir(work)) == ["merged"]


# ------------------------------------------------------------------------------------ output paths
@pytest.mark.parametrize("depth", [1, 3])
def test_output_inside_an_input_folder_is_refused(adapters, depth):
    task = Path(adapters[RG])
    before = tree(task)
    out = task.joinpath(*["sub"] * depth)
    with pytest.raises(AdaMergeXError) as err:
        merge(adapters, out)
    message = one_line(err)
    # (the reference folders of this fixture lie inside the task folder: PEFT's multi-adapter layout)
    assert f"output folder {str(out)!r} is inside the task_adapter input" in message, message
    assert tree(task) == before


def test_dangling_symlink_output_is_refused_up_front(adapters, work):
    link = work / "merged"
    target = work / "missing_parent" / "merged"
    link.symlink_to(target)
    with pytest.raises(AdaMergeXError) as err:
        merge(adapters, link)
    message = one_line(err)
    assert f"output {str(link)!r} is a dangling symlink" in message, message
    assert sorted(os.listdir(work)) == ["merged"] and os.readlink(link) == str(target)


# ----------------------------------------------------------------------- interrupts during the write
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, OSError])
def test_interrupt_during_the_write_leaves_nothing(adapters, work, monkeypatch, exc):
    out = work / "merged"
    real = files._write_adapter

    def write_then_fail(folder, result, record):
        real(folder, result, record)
        raise exc("interrupted")

    monkeypatch.setattr(files, "_write_adapter", write_then_fail)
    with pytest.raises(exc):
        merge(adapters, out)
    assert os.listdir(work) == []


_SLOW_WRITER = textwrap.dedent(
    """
    import signal, sys, time
    import adamergex_peft.files as files
    from adamergex_peft import merge_adapter_files

    def on_term(signum, frame):  # what the CLI does: SIGTERM raises like SIGINT
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    real = files._write_adapter

    def slow(folder, result, record):
        real(folder, result, record)
        print("WRITING", flush=True)
        time.sleep(120)

    files._write_adapter = slow
    merge_adapter_files(*sys.argv[1:4], sys.argv[4])
    """
)


def test_sigterm_during_the_write_cleans_up(adapters, work):
    out = work / "merged"
    args = [sys.executable, "-c", _SLOW_WRITER, adapters[T], adapters[RS], adapters[RG], str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "WRITING", proc.stderr.read()[-2000:]
    assert len([p for p in os.listdir(work) if p.startswith(".amx-")]) == 1  # the temp folder exists now
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert os.listdir(work) == []


# ------------------------------------------------------------------------------------- input files
def test_weights_file_larger_than_available_memory_is_refused(adapters, work, monkeypatch):
    monkeypatch.setattr(files, "available_memory", lambda: 1000)
    with pytest.raises(AdaMergeXError) as err:
        merge(adapters, work / "merged")
    message = one_line(err)
    size = os.path.getsize(os.path.join(adapters[T], "adapter_model.safetensors"))
    assert f"adapter {adapters[T]!r}: adapter_model.safetensors is" in message, message
    assert f"{size / 2**30:.2f} GiB" in message and "only 0.00 GiB of memory is available" in message, message
    assert os.listdir(work) == []


def test_available_memory_is_a_positive_number():
    value = files.available_memory()
    assert value is None or value > 0


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_only_bin_adapter_gets_a_one_line_message(adapters, work, monkeypatch):
    evil = work / "evil"
    evil.mkdir()
    (evil / "adapter_config.json").write_text(Path(adapters[RG], "adapter_config.json").read_text())
    payload = load_file(os.path.join(adapters[RG], "adapter_model.safetensors"))
    payload["extra"] = _Payload()
    (evil / "adapter_model.bin").write_bytes(pickle.dumps(payload))
    monkeypatch.chdir(work)
    before = tree(work)
    with pytest.raises(AdaMergeXError) as err:
        merge_adapter_files(adapters[T], adapters[RS], evil, work / "merged")
    message = one_line(err)
    assert f"adapter {str(evil)!r}: cannot read adapter_model.bin without unpickling" in message, message
    assert "safe_serialization=True" in message and "weights_only" not in message, message
    assert tree(work) == before  # no PWNED, no output


def test_legacy_tensor_only_bin_still_loads(adapters, work):
    legacy = work / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text(Path(adapters[RG], "adapter_config.json").read_text())
    torch.save(load_file(os.path.join(adapters[RG], "adapter_model.safetensors")), legacy / "adapter_model.bin")
    out = merge_adapter_files(adapters[T], adapters[RS], legacy, work / "merged")
    record = json.loads((out / "adamergex_config.json").read_text())
    assert record["config"]["target_reference_adapter"] == str(legacy)
