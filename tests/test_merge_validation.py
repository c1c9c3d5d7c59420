"""Bad input gives one-line errors and changes nothing (issue 9, groups 1, 4, 5 and 6)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import tiny
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from adamergex_peft import AdaMergeXConfig, AdaMergeXError, merge_adapter_files
from adamergex_peft.cli import build_parser, main
from adamergex_peft.merge import AdapterWeights, merge_state_dicts

T, RS, RG = "task", "ref_en", "ref_sw"
WEIGHTS = "adapter_model.safetensors"


def _save(model, root: Path) -> dict[str, Path]:
    model.save_pretrained(str(root))
    return {T: root, RS: root / RS, RG: root / RG}


@pytest.fixture
def lora_dirs(tmp_path):
    spec = {"default": tiny.LLAMA_LORA[T], RS: tiny.LLAMA_LORA[RS], RG: tiny.LLAMA_LORA[RG]}
    return _save(tiny.lora_model(tiny.tiny_llama(), spec), tmp_path / "lora")


@pytest.fixture
def ia3_dirs(tmp_path):
    spec = {"default": tiny.LLAMA_IA3[T], RS: tiny.LLAMA_IA3[RS], RG: tiny.LLAMA_IA3[RG]}
    return _save(tiny.ia3_model(tiny.tiny_llama(), spec), tmp_path / "ia3")


def _snapshot(dirs) -> dict[str, bytes]:
    return {str(p / n): (p / n).read_bytes() for p in dirs.values() for n in (WEIGHTS, "adapter_config.json")}


def _refused(dirs, tmp_path, config, match, **kwargs) -> AdaMergeXError:
    """The file merge raises a one-line AdaMergeXError matching ``match``; nothing is written or changed."""
    before = _snapshot(dirs)
    out = tmp_path / "out"
    with pytest.raises(AdaMergeXError, match=match) as excinfo:
        merge_adapter_files(dirs[T], dirs[RS], dirs[RG], out, config, **kwargs)
    assert "\n" not in str(excinfo.value)
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    assert _snapshot(dirs) == before
    return excinfo.value


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_weights(folder: Path, fn) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    save_file(fn(tensors), str(folder / WEIGHTS))


def cfg(**kw) -> AdaMergeXConfig:
    return AdaMergeXConfig("x", "y", "z", **kw)


# ------------------------------------------------------------------------------ 1. no silent inf
def test_fp16_ia3_overflow_is_refused_in_the_output_dtype(ia3_dirs, tmp_path):
    _edit_weights(ia3_dirs[T], lambda sd: {k: v.half() for k, v in sd.items()})
    # float32 holds the result; float16 (the task adapter's dtype, so the output's) does not
    err = _refused(ia3_dirs, tmp_path, cfg(t=1e5), r"module 'model\.layers\.\d\.\w+\.\w+_proj'.*float16")
    assert "NaN/Inf" in str(err)


def test_fp16_lora_overflow_is_refused(lora_dirs, tmp_path):
    _edit_weights(lora_dirs[T], lambda sd: {k: v.half() for k, v in sd.items()})
    _refused(lora_dirs, tmp_path, cfg(t=1e6), r"module '.*float16")


def test_fp16_ia3_in_range_is_written_and_finite(ia3_dirs, tmp_path):
    _edit_weights(ia3_dirs[T], lambda sd: {k: v.half() for k, v in sd.items()})
    out = merge_adapter_files(ia3_dirs[T], ia3_dirs[RS], ia3_dirs[RG], tmp_path / "ok", cfg(t=-0.5))
    written = load_file(str(out / WEIGHTS))
    assert all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in written.values())


# ---------------------------------------------------------------- 4. adapters of other base models
def test_reference_of_another_architecture_is_refused(lora_dirs, tmp_path):
    gpt2 = tiny.lora_model(tiny.tiny_gpt2(), {"default": tiny.GPT2_LORA[T]})
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    dirs = {**lora_dirs, RG: tmp_path / "gpt2"}
    err = _refused(dirs, tmp_path, cfg(), r"trains none of the task adapter .*'transformer\.h\.0\.attn\.c_attn'")
    assert str(dirs[RG]) in str(err)


def test_different_base_model_names_are_refused_unless_allowed(lora_dirs, tmp_path, caplog):
    _edit_config(lora_dirs[T], base_model_name_or_path="org/llama-a")
    _edit_config(lora_dirs[RS], base_model_name_or_path="org/llama-a")
    _edit_config(lora_dirs[RG], base_model_name_or_path="org/llama-b")
    err = _refused(lora_dirs, tmp_path, cfg(), r"different base models .*org/llama-b.*allow_different_base_models")
    assert err.field == "allow_different_base_models"

    with caplog.at_level(logging.WARNING, logger="adamergex_peft.merge"):
        out = merge_adapter_files(
            lora_dirs[T], lora_dirs[RS], lora_dirs[RG], tmp_path / "ok", cfg(allow_different_base_models=True)
        )
    assert (out / WEIGHTS).is_file()
    assert "different base models" in caplog.text


def test_cli_allow_different_base_models(lora_dirs, tmp_path, capsys):
    _edit_config(lora_dirs[RG], base_model_name_or_path="org/other")
    _edit_config(lora_dirs[T], base_model_name_or_path="org/llama")
    argv = ["merge", "--task-adapter", str(lora_dirs[T]), "--source-reference", str(lora_dirs[RS])]
    argv += ["--target-reference", str(lora_dirs[RG]), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "different base models" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--allow-different-base-models"]) == 0
    record = json.loads((tmp_path / "out" / "adamergex_config.json").read_text())
    assert record["config"]["allow_different_base_models"] is True


# ------------------------------------------------------------------------ 5. one-line errors
def test_rank_zero_lora_factors_are_refused(lora_dirs, tmp_path):
    def zero_rank(sd):
        key = next(k for k in sd if k.endswith("q_proj.lora_A.weight"))
        sd[key] = sd[key][:0].contiguous()
        sd[key.replace("lora_A", "lora_B")] = sd[key.replace("lora_A", "lora_B")][:, :0].contiguous()
        return sd

    _edit_weights(lora_dirs[RS], zero_rank)
    _refused(lora_dirs, tmp_path, cfg(), r"adapter '.*ref_en', module '.*q_proj': rank-0 LoRA factors")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"lora_alpha": "abc"}, r"lora_alpha"),
        ({"r": "abc"}, r"\br\b"),
        ({"r": 7}, r"r=7 does not match the rank 4"),
    ],
)
def test_config_fields_are_checked_against_the_tensors(lora_dirs, tmp_path, changes, match):
    _edit_config(lora_dirs[T], **changes)
    _refused(lora_dirs, tmp_path, cfg(), match)


def test_svd_rank_is_capped_at_the_module_size(lora_dirs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="adamergex_peft.merge"):
        out = merge_adapter_files(
            lora_dirs[T], lora_dirs[RS], lora_dirs[RG], tmp_path / "svd", cfg(lora_strategy="svd", svd_rank=100000)
        )
    assert "svd_rank=100000 exceeds" in caplog.text
    written = load_file(str(out / WEIGHTS))
    assert max(v.shape[0] for k, v in written.items() if k.endswith("lora_A.weight")) == 32  # hidden size
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 32
    record = json.loads((out / "adamergex_config.json").read_text())
    assert record["report"]["svd_rank_requested"] == 100000


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("method", "bogus", r"AdaMergeXConfig\.method must be one of"),
        ("method", ["adamergex"], r"AdaMergeXConfig\.method must be one of"),
        ("lora_strategy", 3, r"AdaMergeXConfig\.lora_strategy must be one of"),
        ("t", "1.0", r"AdaMergeXConfig\.t must be a finite number"),
        ("t", float("inf"), r"AdaMergeXConfig\.t must be a finite number"),
        ("svd_rank", 0, r"AdaMergeXConfig\.svd_rank"),
    ],
)
def test_config_changed_after_construction_is_validated_at_merge_time(lora_dirs, tmp_path, field, value, match):
    config = cfg()
    setattr(config, field, value)
    err = _refused(lora_dirs, tmp_path, config, match)
    assert err.field == field


def test_config_changed_after_construction_in_memory():
    model = tiny.lora_model(tiny.tiny_llama(), tiny.LLAMA_LORA)
    adapters = [
        AdapterWeights(n, model.peft_config[n], get_peft_model_state_dict(model, adapter_name=n)) for n in (T, RS, RG)
    ]
    before = {(a.name, k): v.clone() for a in adapters for k, v in a.state_dict.items()}
    config = AdaMergeXConfig(T, RS, RG)
    config.method = "nope"
    with pytest.raises(AdaMergeXError, match="method must be one of") as excinfo:
        merge_state_dicts(*adapters, config)
    assert "\n" not in str(excinfo.value)
    assert all(torch.equal(before[a.name, k], v) for a in adapters for k, v in a.state_dict.items())


def test_config_errors_carry_the_field():
    for kwargs, field in (
        ({"t": float("nan")}, "t"),
        ({"method": "x"}, "method"),
        ({"ia3_strategy": "x"}, "ia3_strategy"),
        ({"arimerge_weights": (1,)}, "arimerge_weights"),
        ({"allow_different_base_models": "yes"}, "allow_different_base_models"),
    ):
        with pytest.raises(AdaMergeXError) as excinfo:
            cfg(**kwargs)
        assert excinfo.value.field == field
    with pytest.raises(AdaMergeXError) as excinfo:
        AdaMergeXConfig("a", "b", "b")
    assert excinfo.value.field == "target_reference_adapter"


def test_with_adapters_replaces_the_names_and_validates():
    config = cfg(t=0.3, method="cross")
    other = config.with_adapters("t1", "s1", "g1")
    assert (other.task_adapter, other.source_reference_adapter, other.target_reference_adapter) == ("t1", "s1", "g1")
    assert (other.t, other.method) == (0.3, "cross")
    with pytest.raises(AdaMergeXError, match="same adapter"):
        config.with_adapters("t1", "s1", "s1")


# ------------------------------------------------------------------------------ 6. negative t
@pytest.mark.parametrize("text", ["-1e-3", "-1e30", "-0.5", "-2", "1e-3"])
def test_cli_accepts_negative_t(text):
    argv = ["merge", "--task-adapter", "a", "--source-reference", "b", "--target-reference", "c"]
    assert build_parser().parse_args([*argv, "--t", text, "--output", "o"]).t == float(text)
    sweep = ["sweep", "--base-model", "m", "--task-adapter", "a", "--source-reference", "b", "--target-reference", "c"]
    args = build_parser().parse_args([*sweep, "--t", text, "-1e-2", "0", "--tasks", "x", "--output", "o"])
    assert args.t == [float(text), -1e-2, 0.0]


@pytest.mark.parametrize("text", ["-inf", "inf", "nan"])
def test_cli_refuses_infinite_t(text, capsys):
    argv = ["merge", "--task-adapter", "a", "--source-reference", "b", "--target-reference", "c", "--output", "o"]
    with pytest.raises(SystemExit) as excinfo:
        build_parser().parse_args([*argv, "--t", text])
    assert excinfo.value.code == 2
    assert "expected a finite number" in capsys.readouterr().err


def test_cli_negative_t_merge_and_deprecated_task_flag(lora_dirs, tmp_path, capsys):
    argv = ["merge", "--task", str(lora_dirs[T]), "--source-reference", str(lora_dirs[RS])]
    argv += ["--target-reference", str(lora_dirs[RG]), "--output", str(tmp_path / "out"), "--t", "-1e-3"]
    assert main(argv) == 0  # --task: the hidden, deprecated spelling of --task-adapter
    record = json.loads((tmp_path / "out" / "adamergex_config.json").read_text())
    assert record["config"]["t"] == -1e-3
    assert record["config"]["task_adapter"] == str(lora_dirs[T])
    assert "--task " not in build_parser()._subparsers._group_actions[0].choices["merge"].format_help()


# ------------------------------------------------------------------------- the lm-eval model
def test_lm_eval_model_names_every_missing_argument_and_maps_fields():
    model = pytest.importorskip("adamergex_lm_eval.model")
    with pytest.raises(ValueError) as excinfo:
        model.AdaMergeXLM(
            pretrained=None, task_adapter="a", source_reference_adapter="", target_reference_adapter=None
        )
    message = str(excinfo.value)
    assert message.startswith(
        "adamergex model_args: pretrained, source_reference_adapter, target_reference_adapter: required"
    )
    assert "\n" not in message
    adapters = {
        "pretrained": "m",
        "task_adapter": "a",
        "source_reference_adapter": "b",
        "target_reference_adapter": "c",
    }
    for argument, bad in (("lora_strategy", "dense"), ("allow_different_base_models", "maybe")):
        with pytest.raises(ValueError) as excinfo:
            model.AdaMergeXLM(**adapters, **{argument: bad})
        assert str(excinfo.value).startswith(f"adamergex model_args: {argument}: ")
