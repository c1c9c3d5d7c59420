"""Kept for test files that ``import tiny``: everything now lives in :mod:`adamergex_peft.testing`.

New tests import ``adamergex_peft.testing`` directly.
"""

from adamergex_peft.testing import (  # noqa: F401
    GPT2_IA3,
    GPT2_LORA,
    LLAMA_IA3,
    LLAMA_LORA,
    LLAMA_LORA_UNIFORM,
    VOCAB,
    adapter_snapshot,
    assert_unchanged,
    ia3_model,
    lora_model,
    lora_scaling,
    module_scaling,
    randomize_,
    tiny_gpt2,
    tiny_llama,
)
