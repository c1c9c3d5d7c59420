"""Reproduce a merge from its provenance record: `adamergex merge --from-config` / merge_from_record."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file, save_file

from adamergex_peft import AdaMergeXError
from adamergex_peft import testing as tiny
from adamergex_peft.cli import main
from adamergex_peft.files import merge_from_record

T, RS, RG = "task", "ref_en", "ref_sw"
WEIGHTS = "adapter_model.safetensors"


def save(model, folder) -> dict[str, str]:
    model.save_pretrained(str(folder))
    return {n: str(folder / n) for n in (T, RS, RG)}


def argv_for(dirs) -> list[str]:
    return ["merge", "--task-adapter", dirs[T], "--source-reference", dirs[RS], "--target-reference", dirs[RG]]


def files_of(folder) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


def test_from_config_is_bit_identical_and_keeps_every_setting(tmp_path, capsys):
    dirs = save(tiny.lora_model(tiny.tiny_llama(), tiny.LLAMA_LORA), tmp_path / "in")
    out, again = tmp_path / "out", tmp_path / "again"
    settings = ["--t", "-0.35", "--lora-strategy", "svd", "--svd-rank", "5", "--pad-rank", "vllm"]
    settings += ["--target-language", "sw", "--source-language", "en"]
    assert main([*argv_for(dirs), "--output", str(out), *settings]) == 0
    cwd = os.getcwd()
    os.chdir(tmp_path / "in")  # the recorded paths are absolute: another working folder changes nothing
    try:
        assert main(["merge", "--from-config", str(out / "adamergex_config.json"), "--output", str(again)]) == 0
    finally:
        os.chdir(cwd)
    a, b = files_of(out), files_of(again)
    assert a.keys() == b.keys() == {"README.md", "adamergex_config.json", "adapter_config.json", WEIGHTS}
    assert a[WEIGHTS] == b[WEIGHTS] and a["adapter_config.json"] == b["adapter_config.json"]  # bit-identical
    record, record2 = (json.loads(x["adamergex_config.json"]) for x in (a, b))
    assert record2["config"] == record["config"] and record2["inputs"] == record["inputs"]
    assert record2["output"] == record["output"] and record["config"]["pad_rank"] == "vllm"
    assert json.loads(a["adapter_config.json"])["r"] == 8  # svd rank 5, padded to vLLM's 8
    assert b["README.md"].decode() == a["README.md"].decode().replace(str(out), str(again))

    # only --output, --overwrite and --no-card go with --from-config
    assert main(["merge", "--from-config", str(out), "--output", str(tmp_path / "x"), "--t", "1"]) == 2
    assert "do not combine it with --t" in capsys.readouterr().err
    assert main(["merge", "--from-config", str(out), "--output", str(tmp_path / "x"), "--no-card"]) == 0
    assert "README.md" not in os.listdir(tmp_path / "x")
    assert files_of(tmp_path / "x")[WEIGHTS] == a[WEIGHTS]


def test_changed_input_is_named_and_nothing_is_written(tmp_path, capsys):
    dirs = save(tiny.ia3_model(tiny.tiny_llama(), tiny.LLAMA_IA3), tmp_path / "in")
    out = tmp_path / "out"
    assert main([*argv_for(dirs), "--output", str(out), "--t", "0.8", "--ia3-strategy", "power"]) == 0
    again = merge_from_record(out, tmp_path / "again")  # the Python API, from the folder
    assert (again / WEIGHTS).read_bytes() == (out / WEIGHTS).read_bytes()
    assert "README.md" in os.listdir(again)  # recorded: the CLI wrote a card

    sd = load_file(os.path.join(dirs[RG], WEIGHTS))
    key = sorted(sd)[0]
    sd[key] = sd[key] * 1.01
    save_file(sd, os.path.join(dirs[RG], WEIGHTS), metadata={"format": "pt"})
    before = sorted(os.listdir(tmp_path))
    assert main(["merge", "--from-config", str(out / "adamergex_config.json"), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert f"input target_reference_adapter {os.path.realpath(dirs[RG])!r} changed since the record" in err
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(AdaMergeXError, match="cannot read the merge record"):
        merge_from_record(tmp_path / "in", tmp_path / "x")


def test_full_model_record_is_reproduced(tmp_path):
    from test_export import build, read_checkpoint

    base_dir, model, _ = build("lora", "llama", tmp_path)
    dirs = save(model, tmp_path / "in")
    out = tmp_path / "full"
    argv = [*argv_for(dirs), "--output", str(out), "--base-model", str(base_dir), "--into-base", "--dtype", "bfloat16"]
    assert main(argv) == 0
    again = merge_from_record(out / "adamergex_config.json", tmp_path / "again")
    a, b = files_of(out), files_of(again)
    assert a.keys() == b.keys()
    shards = [n for n in a if n.endswith(".safetensors")]
    assert len(shards) >= 3 and all(a[n] == b[n] for n in shards)
    assert all(v.dtype.is_floating_point for v in read_checkpoint(again).values())
    assert json.loads(b["adamergex_config.json"])["export"]["dtype"] == "bfloat16"
