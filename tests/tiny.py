"""Tiny models and adapters built in code, for offline tests.

Adapters are created with ``init_lora_weights=False`` / ``init_ia3_weights=False`` so that they are
not identity, then perturbed so that ``lora_B`` is not zero and (IA)^3 vectors are not all ones.
"""

from __future__ import annotations

import math

import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 64


def tiny_llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 uses Conv1D layers: LoRA with fan_in_fan_out=True."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def randomize_(model: PeftModel, adapter_name: str, seed: int) -> None:
    """Give an adapter random, non-identity weights (lora_B is zero after some inits; ia3_l is ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
                if "ia3_l" in name:
                    param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
                    param.abs_().clamp_(min=0.2)  # positive, away from zero: a valid (IA)^3 denominator
                else:
                    param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def _adapter_model(base, config_cls, adapters: dict[str, dict], seed: int, **defaults) -> PeftModel:
    model = None
    for i, (name, kwargs) in enumerate(adapters.items()):
        config = config_cls(**defaults, **kwargs)
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        randomize_(model, name, seed + i)
    model.eval()
    return model


def lora_model(base, adapters: dict[str, dict], seed: int = 1) -> PeftModel:
    """A PeftModel with one LoRA adapter per entry of ``adapters`` (name -> LoraConfig kwargs)."""
    return _adapter_model(base, LoraConfig, adapters, seed, init_lora_weights=False, lora_dropout=0.0)


def ia3_model(base, adapters: dict[str, dict], seed: int = 1) -> PeftModel:
    """A PeftModel with one (IA)^3 adapter per entry of ``adapters`` (name -> IA3Config kwargs)."""
    return _adapter_model(base, IA3Config, adapters, seed, init_ia3_weights=False)


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """Written out here, independently of the library: alpha/r, or alpha/sqrt(r) under rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def module_scaling(spec: dict[str, dict], adapter: str, module: str) -> float:
    """The scaling of ``adapter`` on ``module`` from the adapter kwargs, rank/alpha patterns included."""
    kw = spec[adapter]
    r = next((v for k, v in kw.get("rank_pattern", {}).items() if module.endswith(k)), kw["r"])
    alpha = next((v for k, v in kw.get("alpha_pattern", {}).items() if module.endswith(k)), kw["lora_alpha"])
    return lora_scaling(alpha, r, kw.get("use_rslora", False))


# Three LoRA adapters with different ranks, alphas, rsLoRA, rank/alpha patterns, and target modules
# that only partly overlap.
LLAMA_LORA = {
    "task": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    "ref_en": {"r": 2, "lora_alpha": 3, "target_modules": ["q_proj", "down_proj", "up_proj"], "use_rslora": True},
    "ref_sw": {
        "r": 6,
        "lora_alpha": 5,
        "target_modules": ["q_proj", "v_proj", "k_proj", "up_proj"],
        "rank_pattern": {"k_proj": 3},
        "alpha_pattern": {"up_proj": 7},
    },
}

GPT2_LORA = {
    "task": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
    "ref_en": {"r": 3, "lora_alpha": 4, "target_modules": ["c_attn"], "fan_in_fan_out": True, "use_rslora": True},
    "ref_sw": {"r": 2, "lora_alpha": 2, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True},
}

# Same rank and alpha everywhere: what the factor-level formulas (factorwise, arimerge, cross) need.
LLAMA_LORA_UNIFORM = {
    "task": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "ref_en": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "ref_sw": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]},
}

# (IA)^3 on GPT-2: c_attn (attention, with a bias) and mlp.c_proj (feed-forward), Conv1D layers.
GPT2_IA3 = {
    "task": {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]},
    "ref_en": {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]},
    "ref_sw": {"target_modules": ["c_attn"], "feedforward_modules": []},
}

# (IA)^3 on attention (k, v) and feed-forward (down) modules, partly overlapping.
LLAMA_IA3 = {
    "task": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "ref_en": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "ref_sw": {"target_modules": ["k_proj", "down_proj", "up_proj"], "feedforward_modules": ["down_proj", "up_proj"]},
}


def adapter_snapshot(model: PeftModel) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (to check that nothing changed)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: PeftModel, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(snapshot), sorted(set(now) ^ set(snapshot))[:5]
    for key, value in snapshot.items():
        same = torch.equal(torch.isnan(now[key]), torch.isnan(value)) and torch.equal(
            now[key].nan_to_num(), value.nan_to_num()
        )
        assert same, f"{key} changed"
