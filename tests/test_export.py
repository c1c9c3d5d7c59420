"""export_merged_model (full-model export, shard by shard) and the vLLM readiness helpers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import tiny
import torch
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from adamergex_peft import AdaMergeXConfig, AdaMergeXError, merge_adapter_files, merge_state_dicts
from adamergex_peft.export import export_merged_model
from adamergex_peft.merge import AdapterWeights
from adamergex_peft.serving import (
    VLLM_MAX_LORA_RANKS,
    pad_lora_rank,
    vllm_max_lora_rank,
    vllm_padded_rank,
    vllm_problems,
)

T, RS, RG = "task", "ref_en", "ref_sw"
TOKENS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 3], [1, 40, 2, 7, 60, 33, 11, 4]])
SHARD = "20KB"


def cfg(t: float = 0.7, **kw) -> AdaMergeXConfig:
    return AdaMergeXConfig(task_adapter=T, source_reference_adapter=RS, target_reference_adapter=RG, t=t, **kw)


def tokenizer():
    """A word-level fast tokenizer over the tiny vocabulary (to check that tokenizer files are copied)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, tiny.VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def save_base(base, folder, shard: str | None = SHARD):
    base.generation_config.max_new_tokens = 7  # something to find in the copied generation_config.json
    if shard is None:
        base.save_pretrained(folder)
    else:
        base.save_pretrained(folder, max_shard_size=shard)
    tokenizer().save_pretrained(folder)
    return folder


def build(kind: str, arch: str, tmp_path, shard: str | None = SHARD):
    """(base folder, PeftModel over the same base weights with three random adapters, spec)."""
    spec = {("lora", "llama"): tiny.LLAMA_LORA, ("lora", "gpt2"): tiny.GPT2_LORA}.get((kind, arch))
    spec = spec or {"llama": tiny.LLAMA_IA3, "gpt2": tiny.GPT2_IA3}[arch]
    base = tiny.tiny_llama() if arch == "llama" else tiny.tiny_gpt2()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # GPT-2 biases start at zero: make them non-zero so that scaling them shows
        for name, param in base.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    base_dir = save_base(base, tmp_path / f"base_{arch}", shard)
    model = (tiny.lora_model if kind == "lora" else tiny.ia3_model)(base, spec)
    return base_dir, model, spec


def weights_of(model, name):
    return AdapterWeights(name, model.peft_config[name], get_peft_model_state_dict(model, adapter_name=name))


def merged_result(model, config):
    return merge_state_dicts(*(weights_of(model, n) for n in (T, RS, RG)), config)


def read_checkpoint(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(str(folder / name)))
    return out


def checkpoint_key(model, module_name: str, suffix: str, keys) -> str:
    """PEFT module path -> checkpoint key (written out here, independently of export.py)."""
    name = module_name.removeprefix("base_model.model.") + suffix
    return name if name in keys else name.split(".", 1)[1]


def expected_weights(model, spec, base_sd, t):
    """Float64 closed form: W + dW_T + t (dW_Rg - dW_Rs) (LoRA), W * l ((IA)^3), per merged module."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            update = 0.0
            for adapter, w in ((T, 1.0), (RG, t), (RS, -t)):
                if adapter in layer.lora_A:
                    s = tiny.module_scaling(spec, adapter, name)
                    d = s * (layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double())
                    update = update + w * (d.T if layer.fan_in_fan_out else d)
            key = checkpoint_key(model, name, ".weight", base_sd)
            out[key] = base_sd[key].double() + update
        elif isinstance(layer, IA3Layer):
            vecs = {a: layer.ia3_l[a].double() for a in (T, RG, RS) if a in layer.ia3_l}
            ones = torch.ones_like(next(iter(vecs.values())))
            l_t, l_g, l_s = (vecs.get(a, ones) for a in (T, RG, RS))
            vec = l_t * (t * (l_g / l_s - 1.0) + 1.0)
            key = checkpoint_key(model, name, ".weight", base_sd)
            out[key] = base_sd[key].double() * (vec.T if layer.fan_in_fan_out else vec)
            bias = layer.get_base_layer().bias
            if not layer.is_feedforward and bias is not None:
                bkey = checkpoint_key(model, name, ".bias", base_sd)
                out[bkey] = base_sd[bkey].double() * vec.reshape(-1)
    return out


def in_memory_logits(model, config):
    model.merge_crosslingual_into_base(config)
    with torch.no_grad(), model.disable_adapter():
        return model(input_ids=TOKENS).logits


def fresh_process_logits(folder, tmp_path) -> torch.Tensor:
    """Load the export with plain transformers in a new interpreter; adamergex_peft must not be imported."""
    out = tmp_path / "logits.pt"
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
        AutoTokenizer.from_pretrained({str(folder)!r})
        assert model.generation_config.max_new_tokens == 7
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({TOKENS.tolist()!r})).logits
        assert 'adamergex_peft' not in sys.modules, 'adamergex_peft was imported'
        assert 'peft' not in sys.modules, 'peft was imported'
        torch.save(logits, {str(out)!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def listing(folder):
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------------- correct output
@pytest.mark.parametrize(("kind", "arch"), [("lora", "llama"), ("ia3", "llama"), ("lora", "gpt2"), ("ia3", "gpt2")])
def test_export_equals_closed_form_and_in_memory_merge(kind, arch, tmp_path):
    base_dir, model, spec = build(kind, arch, tmp_path)
    base_files = listing(base_dir)
    base_digests = {n: hashlib.sha256((base_dir / n).read_bytes()).hexdigest() for n in base_files}
    assert sum(n.endswith(".safetensors") for n in base_files) >= 3, base_files  # really sharded
    base_sd = read_checkpoint(base_dir)
    t = 0.7
    result = merged_result(model, cfg(t))

    out = export_merged_model(base_dir, result, tmp_path / "out")
    assert out == tmp_path / "out"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary folder left
    # same shard layout and side files as the base, plus the provenance record
    assert listing(out) == sorted({*base_files, "adamergex_config.json"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    written = read_checkpoint(out)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in written.values())

    # every tensor: the float64 closed form where merged, the base tensor (bit for bit) elsewhere
    expected = expected_weights(model, spec, base_sd, t)
    assert expected, "no merged module"
    assert set(written) == set(base_sd)
    for key, value in written.items():
        assert value.dtype == torch.float32
        if key in expected:
            assert torch.allclose(value.double(), expected[key], rtol=1e-6, atol=1e-6), key
            assert not torch.equal(value, base_sd[key]), f"{key} was not updated"
        else:
            assert torch.equal(value, base_sd[key]), key
    if (kind, arch) == ("ia3", "gpt2"):
        assert any(k.endswith("c_attn.bias") for k in expected)  # non-feed-forward bias scaled
        assert not any(k.endswith("mlp.c_proj.bias") for k in expected)  # feed-forward bias kept

    # the base checkpoint is untouched (in-place updates never reach the memory-mapped source)
    assert {n: hashlib.sha256((base_dir / n).read_bytes()).hexdigest() for n in base_files} == base_digests

    # the exported model computes what the in-memory merge does, loaded without this package
    reference = in_memory_logits(model, cfg(t))
    logits = fresh_process_logits(out, tmp_path)
    assert torch.allclose(logits, reference, rtol=1e-5, atol=1e-5), float((logits - reference).abs().max())
    record = json.loads((out / "adamergex_config.json").read_text())
    assert record["export"]["peft_type"] == kind.upper() and record["export"]["dtype"] == "base"


def test_export_from_adapter_folder_keeps_provenance(tmp_path):
    base_dir, model, _ = build("lora", "llama", tmp_path)
    model.save_pretrained(tmp_path / "adapters")
    dirs = {n: tmp_path / "adapters" / n for n in (T, RS, RG)}  # PEFT saves each named adapter in a sub-folder
    merged_dir = merge_adapter_files(dirs[T], dirs[RS], dirs[RG], tmp_path / "merged", AdaMergeXConfig("a", "b", "c"))
    via_folder = export_merged_model(base_dir, merged_dir, tmp_path / "out_folder")
    via_result = export_merged_model(base_dir, merged_result(model, cfg(1.0)), tmp_path / "out_result")
    a, b = read_checkpoint(via_folder), read_checkpoint(via_result)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((via_folder / "adamergex_config.json").read_text())
    adapter_record = json.loads((merged_dir / "adamergex_config.json").read_text())
    assert record["inputs"] == adapter_record["inputs"] and record["config"] == adapter_record["config"]
    assert record["export"]["adapter"] == str(merged_dir)


def test_export_plain_adapter_with_rank_and_alpha_patterns(tmp_path):
    """Any LoRA adapter exports too: rank_pattern, alpha_pattern and rsLoRA scalings per module."""
    base_dir, model, spec = build("lora", "llama", tmp_path)
    base_sd = read_checkpoint(base_dir)
    for adapter in (RG, RS):  # ref_sw: rank/alpha patterns; ref_en: rsLoRA
        written = read_checkpoint(export_merged_model(base_dir, weights_of(model, adapter), tmp_path / adapter))
        n = 0
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
                s = tiny.module_scaling(spec, adapter, name)
                key = checkpoint_key(model, name, ".weight", base_sd)
                ref = base_sd[key].double() + s * (
                    layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double()
                )
                assert torch.allclose(written[key].double(), ref, rtol=1e-6, atol=1e-6), (adapter, key)
                n += 1
        assert n == sum(1 for k, v in written.items() if not torch.equal(v, base_sd[k]))


def test_checkpoint_without_the_model_prefix(tmp_path):
    """A GPT-2 checkpoint saved with the backbone's names (``h.0.attn.c_attn``, as on the Hub)."""
    from safetensors.torch import save_file

    base_dir, model, _ = build("lora", "gpt2", tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    weight_map = {}
    for name in listing(base_dir):
        if name.endswith(".safetensors"):
            tensors = {k.removeprefix("transformer."): v for k, v in load_file(str(base_dir / name)).items()}
            save_file(tensors, str(bare / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
        elif name != "model.safetensors.index.json":
            (bare / name).write_bytes((base_dir / name).read_bytes())
    (bare / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    result = merged_result(model, cfg(0.3))
    with_prefix = read_checkpoint(export_merged_model(base_dir, result, tmp_path / "out_prefix"))
    without = read_checkpoint(export_merged_model(bare, result, tmp_path / "out_bare"))
    assert {k.removeprefix("transformer."): v for k, v in with_prefix.items()}.keys() == without.keys()
    for key, value in with_prefix.items():
        assert torch.equal(value, without[key.removeprefix("transformer.")]), key


def test_export_single_file_base_and_bf16(tmp_path):
    base_dir, model, spec = build("lora", "llama", tmp_path, shard=None)
    assert "model.safetensors" in listing(base_dir) and "model.safetensors.index.json" not in listing(base_dir)
    base_sd = read_checkpoint(base_dir)
    out = export_merged_model(base_dir, merged_result(model, cfg(0.4)), tmp_path / "out", dtype="bf16")
    assert "model.safetensors.index.json" not in listing(out)
    written = read_checkpoint(out)
    expected = expected_weights(model, spec, base_sd, 0.4)
    for key, value in written.items():
        assert value.dtype == torch.bfloat16, key
        # one rounding from the float32 result (not base rounded to bf16, then the sum rounded again)
        ref = expected[key] if key in expected else base_sd[key].double()
        assert torch.equal(value, ref.float().to(torch.bfloat16)) or torch.allclose(
            value.double(), ref, rtol=2**-8, atol=0
        ), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------- bad input
def _assert_nothing_written(tmp_path, before):
    assert listing(tmp_path) == before  # no output folder, no temporary folder


def test_module_missing_from_checkpoint(tmp_path):
    base_dir, _, _ = build("lora", "llama", tmp_path)
    (tmp_path / "g").mkdir()
    _, gpt2_model, _ = build("lora", "gpt2", tmp_path / "g")
    before = listing(tmp_path)
    with pytest.raises(AdaMergeXError, match=r"module 'transformer\.h\.\d\.attn\.c_attn': no tensor .* in the base"):
        export_merged_model(base_dir, merged_result(gpt2_model, cfg()), tmp_path / "out")
    _assert_nothing_written(tmp_path, before)


def test_shape_mismatch(tmp_path):
    base_dir = save_base(tiny.tiny_llama(hidden=48), tmp_path / "wide")
    model = tiny.lora_model(tiny.tiny_llama(), tiny.LLAMA_LORA)
    before = listing(tmp_path)
    with pytest.raises(
        AdaMergeXError, match=r"module 'model\.layers\.0\.\w+\.\w+_proj': update of shape .* does not fit"
    ):
        export_merged_model(base_dir, merged_result(model, cfg()), tmp_path / "out")
    _assert_nothing_written(tmp_path, before)


def test_corrupt_base_shard_is_one_line_error(tmp_path):
    base_dir, model, _ = build("lora", "llama", tmp_path)
    shard = sorted(base_dir.glob("*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)  # not a safetensors header
    before = listing(tmp_path)
    with pytest.raises(AdaMergeXError, match="is not a readable safetensors file") as info:
        export_merged_model(base_dir, merged_result(model, cfg()), tmp_path / "out")
    assert "\n" not in str(info.value) and shard.name in str(info.value)
    _assert_nothing_written(tmp_path, before)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    base_dir, model, _ = build("ia3", "llama", tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    before = listing(tmp_path)
    with pytest.raises(AdaMergeXError, match="exists; pass overwrite=True"):
        export_merged_model(base_dir, merged_result(model, cfg()), tmp_path / "out")
    _assert_nothing_written(tmp_path, before)
    assert listing(tmp_path / "out") == ["keep.txt"]
    export_merged_model(base_dir, merged_result(model, cfg()), tmp_path / "out", overwrite=True)
    assert "keep.txt" not in listing(tmp_path / "out") and listing(tmp_path) == before


def test_overflow_in_output_dtype_is_refused(tmp_path):
    base_dir, model, _ = build("lora", "llama", tmp_path)
    result = merged_result(model, cfg())
    key = next(k for k in result.state_dict if k.endswith("lora_A.weight"))
    result.state_dict[key] = result.state_dict[key] * 1e6  # finite in float32, overflows float16
    before = listing(tmp_path)
    with pytest.raises(
        AdaMergeXError, match=r"module 'model\.layers\..*': the merged tensor .* NaN/Inf values in torch.float16"
    ):
        export_merged_model(base_dir, result, tmp_path / "out", dtype=torch.float16)
    _assert_nothing_written(tmp_path, before)


def test_bad_dtype_and_missing_base(tmp_path):
    base_dir, model, _ = build("lora", "llama", tmp_path)
    result = merged_result(model, cfg())
    before = listing(tmp_path)
    with pytest.raises(AdaMergeXError, match="dtype 'int8' is not one of"):
        export_merged_model(base_dir, result, tmp_path / "out", dtype="int8")
    with pytest.raises(AdaMergeXError, match="neither a local folder nor a Hub snapshot in the local cache"):
        export_merged_model(tmp_path / "nope", result, tmp_path / "out")
    (base_dir / "model.safetensors.index.json").rename(tmp_path / "index.json")
    with pytest.raises(AdaMergeXError, match="no model.safetensors or model.safetensors.index.json"):
        export_merged_model(base_dir, result, tmp_path / "out")
    assert listing(tmp_path) == sorted([*before, "index.json"])


# ------------------------------------------------------------------------------------------- vLLM
def test_vllm_rank_of_merged_adapter(tmp_path):
    _, model, _ = build("lora", "llama", tmp_path)
    result = merged_result(model, cfg())
    # exact merge of ranks 4 + 6 + 2 = 12 (rank pattern k_proj: 3): one r, one alpha, no patterns
    assert result.peft_config.r == 12
    assert vllm_problems(result.peft_config, result.state_dict) == []
    assert vllm_max_lora_rank(result.peft_config, result.state_dict) == 16
    # the same from adapter_config.json as written to disk
    result.peft_config.save_pretrained(str(tmp_path / "cfg"))
    as_dict = json.loads((tmp_path / "cfg" / "adapter_config.json").read_text())
    assert vllm_max_lora_rank(as_dict) == 16
    # the inputs themselves: rank/alpha patterns are refused
    problems = vllm_problems(model.peft_config[RG])
    assert any("rank_pattern" in p for p in problems) and any("alpha_pattern" in p for p in problems)
    with pytest.raises(AdaMergeXError, match="'ref_sw' is not vLLM-ready: rank_pattern is set"):
        vllm_max_lora_rank(model.peft_config[RG], name=RG)


def test_vllm_rules(tmp_path):
    from peft import IA3Config, LoraConfig

    assert VLLM_MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert [vllm_padded_rank(r) for r in (1, 2, 8, 9, 24, 300, 321, 512)] == [1, 8, 8, 16, 32, 320, 512, 512]
    with pytest.raises(AdaMergeXError):
        vllm_padded_rank(513)
    assert vllm_max_lora_rank(LoraConfig(r=24, lora_alpha=24)) == 32
    assert "DoRA" in " ".join(vllm_problems(LoraConfig(r=8, use_dora=True)))
    assert "modules_to_save" in " ".join(vllm_problems(LoraConfig(r=8, modules_to_save=["lm_head"])))
    assert "biases" in " ".join(vllm_problems(LoraConfig(r=8, bias="all")))
    assert "exceeds" in " ".join(vllm_problems(LoraConfig(r=600)))
    assert "LoRA adapters only" in " ".join(vllm_problems(IA3Config()))
    sd = {"m.lora_A.weight": torch.zeros(4, 3), "n.lora_A.weight": torch.zeros(8, 3)}
    assert "1 modules have a rank other than r=8 (first: 'm.lora_A.weight', rank 4)" in " ".join(
        vllm_problems(LoraConfig(r=8), sd)
    )


def test_pad_lora_rank_is_exact():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(6, 5, generator=gen)
    pa, pb = pad_lora_rank(a, b, 16)
    assert pa.shape == (16, 7) and pb.shape == (6, 16)
    assert torch.equal(pa[:5], a) and torch.equal(pb[:, :5], b)
    assert not pa[5:].any() and not pb[:, 5:].any()
    assert torch.allclose((pb.double() @ pa.double()), b.double() @ a.double(), rtol=0, atol=1e-12)
    with pytest.raises(AdaMergeXError, match="--lora-strategy svd --svd-rank 4"):
        pad_lora_rank(a, b, 4)


# --------------------------------------------------------------------------- from the CLI / the API
@pytest.mark.parametrize(("kind", "arch"), [("lora", "llama"), ("ia3", "gpt2")])
def test_cli_into_base_equals_in_memory_merge(kind, arch, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    from adamergex_peft.cli import main

    base_dir, model, _ = build(kind, arch, tmp_path)
    model.save_pretrained(tmp_path / "adapters")
    dirs = {n: str(tmp_path / "adapters" / n) for n in (T, RS, RG)}
    out = tmp_path / "full"
    argv = ["merge", "--task-adapter", dirs[T], "--source-reference", dirs[RS], "--target-reference", dirs[RG]]
    argv += ["--base-model", str(base_dir), "--into-base", "--output", str(out), "--t", "0.7"]
    argv += ["--target-language", "sw", "--source-language", "en"]
    assert main(argv) == 0
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    assert listing(out) == sorted({*listing(base_dir), "adamergex_config.json", "README.md"})
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = exported(input_ids=TOKENS).logits
    reference = in_memory_logits(model, cfg(0.7))
    assert torch.allclose(logits, reference, rtol=1e-5, atol=1e-5), float((logits - reference).abs().max())

    record = json.loads((out / "adamergex_config.json").read_text())  # the in-memory merge's provenance
    assert record["config"]["t"] == 0.7 and record["config"]["task_adapter"] == dirs[T]
    digest = hashlib.sha256((tmp_path / "adapters" / RG / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert record["inputs"]["target_reference_adapter"]["weights_sha256"] == digest
    assert record["export"]["peft_type"] == kind.upper() and record["output"]["into_base"] is True
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.language == ["en", "sw"]
    assert kind in card.data.tags and digest in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{out}")' in card.text

    # the Python API: the same folder (bf16 here), and the bad combinations are refused up front
    api = merge_adapter_files(
        dirs[T], dirs[RS], dirs[RG], tmp_path / "api", cfg(0.7), base_model=base_dir, into_base=True, dtype="bfloat16"
    )
    written, reference_sd = read_checkpoint(api), read_checkpoint(out)
    assert all(v.dtype == torch.bfloat16 for v in written.values())
    assert written.keys() == reference_sd.keys()
    for key, value in written.items():  # one rounding of the float32 result
        assert torch.allclose(value.double(), reference_sd[key].double(), rtol=2**-8, atol=0), key
    assert json.loads((api / "config.json").read_text())["dtype"] == "bfloat16"
    before = listing(tmp_path)
    with pytest.raises(AdaMergeXError, match="into_base .* needs base_model"):
        merge_adapter_files(dirs[T], dirs[RS], dirs[RG], tmp_path / "x", into_base=True)
    with pytest.raises(AdaMergeXError, match="dtype .* applies to a full-model export only"):
        merge_adapter_files(dirs[T], dirs[RS], dirs[RG], tmp_path / "x", dtype="float16")
    assert listing(tmp_path) == before
