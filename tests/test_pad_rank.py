"""pad_rank / --pad-rank: one r, one lora_alpha, no patterns (vLLM-ready), the same update exactly."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from adamergex_peft import AdaMergeXConfig, AdaMergeXError, merge_adapter_files, merge_state_dicts
from adamergex_peft import testing as tiny
from adamergex_peft.cli import main
from adamergex_peft.merge import AdapterWeights
from adamergex_peft.serving import vllm_max_lora_rank, vllm_problems

T, RS, RG = "task", "ref_en", "ref_sw"


def cfg(**kw) -> AdaMergeXConfig:
    return AdaMergeXConfig(T, RS, RG, **kw)


def adapters(model):
    return [
        AdapterWeights(n, model.peft_config[n], get_peft_model_state_dict(model, adapter_name=n)) for n in (T, RS, RG)
    ]


def closed_form(model, spec, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """float64 ``sum_X w_X s_X B_X A_X`` per module (PEFT module name without the prefix)."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            total = 0.0
            for adapter, w in weights.items():
                if adapter in layer.lora_A:
                    s = tiny.module_scaling(spec, adapter, name)
                    total = total + w * s * (
                        layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double()
                    )
            out[name.removeprefix("base_model.model.")] = total
    return out


def updates(peft_config, state_dict) -> dict[str, torch.Tensor]:
    """float64 ``s B A`` per module of a merged adapter, with its one scaling (no patterns)."""
    assert not peft_config.rank_pattern and not peft_config.alpha_pattern
    s = peft_config.lora_alpha / peft_config.r
    out = {}
    for key, a in state_dict.items():
        if key.endswith(".lora_A.weight"):
            b = state_dict[key.replace("lora_A", "lora_B")]
            assert a.shape[0] == peft_config.r and b.shape[1] == peft_config.r
            out[key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")] = s * (b.double() @ a.double())
    return out


@pytest.mark.parametrize(
    ("spec", "settings", "pad", "needed", "alpha"),
    [
        (tiny.LLAMA_LORA, {"t": 0.7}, 16, 12, 16),  # stacked 4 + 6 + 2 (rank pattern, rsLoRA): scaling 1
        (tiny.LLAMA_LORA, {"t": -0.3}, "vllm", 12, 16),
        (tiny.LLAMA_LORA, {"lora_strategy": "svd", "svd_rank": 5}, 8, 5, 8),
        (tiny.LLAMA_LORA_UNIFORM, {"lora_strategy": "factorwise", "t": 0.4}, 32, 4, 64),  # scaling 2 kept
        (tiny.LLAMA_LORA_UNIFORM, {"method": "arimerge"}, 8, 4, 16),
    ],
)
def test_padding_is_exact_and_vllm_ready(spec, settings, pad, needed, alpha, tmp_path):
    model = tiny.lora_model(tiny.tiny_llama(), spec)
    plain = merge_state_dicts(*adapters(model), cfg(**settings))
    padded = merge_state_dicts(*adapters(model), cfg(**settings, pad_rank=pad))
    assert plain.report["rank"] == needed and plain.report["needed_rank"] == needed
    expected_rank = 16 if pad == "vllm" else pad
    assert padded.report["rank"] == expected_rank and padded.report["needed_rank"] == needed
    assert padded.peft_config.r == expected_rank and padded.peft_config.lora_alpha == alpha
    assert not padded.peft_config.use_rslora

    a, b = updates(plain.peft_config, plain.state_dict), updates(padded.peft_config, padded.state_dict)
    assert a.keys() == b.keys()
    for module in a:
        assert torch.allclose(a[module], b[module], rtol=1e-12, atol=1e-12), module
    if settings.get("lora_strategy", "exact") == "exact" and settings.get("method", "adamergex") == "adamergex":
        t = settings.get("t", 1.0)
        reference = closed_form(model, spec, {T: 1.0, RG: t, RS: -t})
        for module, value in b.items():
            assert torch.allclose(value, reference[module], rtol=1e-5, atol=1e-6), module
    # the padded part is exactly zero: the first `needed` components are the unpadded factors
    for key, tensor in padded.state_dict.items():
        if key.endswith("lora_A.weight"):
            assert torch.equal(tensor[:needed], plain.state_dict[key]) and not tensor[needed:].any()

    # what vLLM reads: adapter_config.json as written, and the weights
    padded.peft_config.save_pretrained(str(tmp_path))
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert vllm_problems(on_disk, padded.state_dict) == []
    assert vllm_max_lora_rank(on_disk, padded.state_dict) == expected_rank
    assert on_disk["rank_pattern"] == {} and on_disk["alpha_pattern"] == {}


def test_pad_rank_below_the_needed_rank_writes_nothing(tmp_path, capsys):
    model = tiny.lora_model(tiny.tiny_llama(), tiny.LLAMA_LORA)
    with pytest.raises(
        AdaMergeXError, match=r"pad_rank=8 is below the rank 12 .*--lora-strategy svd --svd-rank 8"
    ) as e:
        merge_state_dicts(*adapters(model), cfg(pad_rank=8))
    assert e.value.field == "pad_rank" and "\n" not in str(e.value)

    model.save_pretrained(str(tmp_path / "in"))
    dirs = [str(tmp_path / "in" / n) for n in (T, RS, RG)]
    before = sorted(os.listdir(tmp_path))
    argv = ["merge", "--task-adapter", dirs[0], "--source-reference", dirs[1], "--target-reference", dirs[2]]
    assert main([*argv, "--output", str(tmp_path / "out"), "--pad-rank", "8"]) == 2
    err = capsys.readouterr().err
    assert "pad_rank=8 is below the rank 12" in err and err.strip().count("\n") == 0
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary folder

    # the same merge padded from the CLI: recorded, vLLM-ready, the card gives --max-lora-rank 32
    assert main([*argv, "--output", str(tmp_path / "out"), "--pad-rank", "32"]) == 0
    on_disk = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert on_disk["r"] == 32 and on_disk["lora_alpha"] == 32
    assert vllm_max_lora_rank(on_disk, weights) == 32
    record = json.loads((tmp_path / "out" / "adamergex_config.json").read_text())
    assert record["config"]["pad_rank"] == 32 and record["report"]["needed_rank"] == 12
    assert "--max-lora-rank 32" in (tmp_path / "out" / "README.md").read_text()


def test_pad_rank_vllm_from_the_python_api(tmp_path):
    model = tiny.lora_model(tiny.tiny_llama(), tiny.LLAMA_LORA)
    model.save_pretrained(str(tmp_path / "in"))
    dirs = [tmp_path / "in" / n for n in (T, RS, RG)]
    out = merge_adapter_files(*dirs, tmp_path / "out", cfg(pad_rank="vllm"))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    assert AdaMergeXConfig.from_pretrained(out).pad_rank == "vllm"


def test_pad_rank_is_validated_and_ignored_for_ia3(caplog):
    for bad in (0, -1, 2.5, True, "16"):
        with pytest.raises(AdaMergeXError, match="pad_rank must be a positive int, 'vllm' or None") as e:
            cfg(pad_rank=bad)
        assert e.value.field == "pad_rank"
    model = tiny.ia3_model(tiny.tiny_llama(), tiny.LLAMA_IA3)
    with caplog.at_level(logging.WARNING, logger="adamergex_peft.merge"):
        with_pad = merge_state_dicts(*adapters(model), cfg(pad_rank=16))
    assert "ignores: pad_rank=16 ((IA)^3 adapters have no rank)" in caplog.text
    without = merge_state_dicts(*adapters(model), cfg())
    assert all(torch.equal(with_pad.state_dict[k], without.state_dict[k]) for k in without.state_dict)


def test_merge_crosslingual_gets_pad_rank_through_the_config():
    model = tiny.lora_model(tiny.tiny_llama(), tiny.LLAMA_LORA)
    model.merge_crosslingual(cfg(t=0.5), "plain")
    model.merge_crosslingual(cfg(t=0.5, pad_rank=32), "padded")
    assert model.peft_config["plain"].r == 12 and model.peft_config["padded"].r == 32
    assert model.peft_config["padded"].lora_alpha == 32 and not model.peft_config["padded"].rank_pattern
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        model.set_adapter("plain")
        plain = model(input_ids=ids).logits
        model.set_adapter("padded")
        padded = model(input_ids=ids).logits
    assert torch.allclose(plain, padded, rtol=1e-6, atol=1e-6)
