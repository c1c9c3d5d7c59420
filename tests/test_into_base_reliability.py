"""merge_crosslingual_into_base / undo: no silent inf, exact restore or refusal, safe adapter names (issue 9)."""

from __future__ import annotations

import pytest
import tiny
import torch

import adamergex_peft.model as model_module
from adamergex_peft import AdaMergeXConfig, AdaMergeXError, merge_crosslingual, merge_crosslingual_into_base

T, RS, RG = "task", "ref_en", "ref_sw"
MODULE = "model.layers.1.self_attn.v_proj"  # in the merged update of both the LoRA and the (IA)^3 specs


def cfg(**kw) -> AdaMergeXConfig:
    return AdaMergeXConfig(task_adapter=T, source_reference_adapter=RS, target_reference_adapter=RG, **kw)


def build(kind: str, dtype: torch.dtype = torch.float32):
    base = tiny.tiny_llama().to(dtype)
    if kind == "lora":
        return tiny.lora_model(base, tiny.LLAMA_LORA)
    return tiny.ia3_model(base, tiny.LLAMA_IA3)


def bits(model) -> dict[str, tuple[torch.dtype, bytes]]:
    """Every parameter and buffer as (dtype, raw bytes): equality means bit-identical."""
    return {
        k: (v.dtype, v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        for k, v in model.state_dict().items()
    }


def base_weight(model, module: str = MODULE) -> torch.nn.Parameter:
    return model.base_model.model.get_submodule(module).get_base_layer().weight


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------ 1. no inf in the base weights
@pytest.mark.parametrize("kind", ["lora", "ia3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_overflow_in_weight_dtype_is_refused_and_everything_restored(kind, dtype):
    model = build(kind, dtype)
    assert base_weight(model).dtype == dtype
    with torch.no_grad():  # one late module at the edge of its dtype: the merge overflows only there
        base_weight(model).fill_(torch.finfo(dtype).max / (1 if kind == "lora" else 2))
    # LoRA: dW ~ t * 0.1 must exceed half an ulp at the dtype's maximum; (IA)^3: |l| > 2 somewhere
    t = {"lora": {torch.float16: 1e3, torch.bfloat16: 1e37}, "ia3": {torch.float16: 1e3, torch.bfloat16: 1e3}}
    before = bits(model)
    calls = []
    real = model_module._all_finite
    model_module_all_finite = lambda x: calls.append(1) or real(x)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_module, "_all_finite", model_module_all_finite)
        with pytest.raises(AdaMergeXError) as err:
            merge_crosslingual_into_base(model, cfg(t=t[kind][dtype]))
    message = one_line(err)
    assert f"module {MODULE!r}" in message and str(dtype) in message and "NaN/Inf" in message, message
    assert len(calls) > 1  # modules before this one were merged (and then rolled back)
    assert bits(model) == before


def test_overflow_rollback_without_exact_undo():
    """Without copies, modules already committed are divided out again: (IA)^3 comes back to one rounding."""
    model = build("ia3", torch.float16)
    with torch.no_grad():
        base_weight(model).fill_(torch.finfo(torch.float16).max / 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdaMergeXError, match="float16"):
        merge_crosslingual_into_base(model, cfg(t=1e3), exact_undo=False)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.allclose(after[key].float(), value.float(), rtol=2e-3, atol=0), key
    assert torch.equal(base_weight(model), before[f"base_model.model.{MODULE}.base_layer.weight"])  # from its copy


# ------------------------------------------------------------------------------- 3. undo: exact or refuse
def scale_lora_b_(model, factor: float) -> None:
    """Shrink (or grow) every adapter's update: realistic LoRA updates are 1e-3..1e-2 of |W|."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.mul_(factor)


def fix_pieces(handle) -> list:
    return [piece for items in handle._entries for item in items for piece in item.fix.blocks]


@pytest.mark.parametrize("chunk", [None, 100], ids=["one_block", "many_blocks"])
@pytest.mark.parametrize("kind", ["lora", "ia3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_twenty_merge_undo_cycles_leave_the_base_bit_identical(kind, dtype, chunk, monkeypatch):
    """Default settings, every dtype; ``many_blocks``: row blocks of 100 entries (3 rows of the 32-wide weights)."""
    if chunk is not None:
        monkeypatch.setattr(model_module, "_CHUNK_ELEMENTS", chunk)
    model = build(kind, dtype)
    before = bits(model)
    ids = torch.randint(3, tiny.VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model.disable_adapter():
        clean = model(ids).logits
    for i, t in enumerate(torch.linspace(-1.5, 2.0, 20).tolist()):
        handle = merge_crosslingual_into_base(model, cfg(t=t))
        assert handle.exact_undo
        if i == 7:  # the merge really changed the base, and the plain inverse would not restore it
            with torch.no_grad(), model.disable_adapter():
                assert (model(ids).logits - clean).abs().max() > 1e-3
            assert handle.undo_bytes > 0
        handle.undo()
    assert bits(model) == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_small_updates_keep_a_small_fix_up(dtype):
    """LoRA updates of ~1e-2 of |W|: a few % of the entries do not round-trip, far below a full copy."""
    model = build("lora", dtype)
    scale_lora_b_(model, 1e-3)
    before = bits(model)
    w0 = base_weight(model).detach().clone()
    handle = merge_crosslingual_into_base(model, cfg(t=0.8))
    relative = ((base_weight(model).float() - w0.float()).abs().mean() / w0.float().abs().mean()).item()
    assert 1e-3 < relative < 5e-2, relative  # the regime described: a realistic update size
    full_copy = handle.weight_bytes
    assert full_copy == sum(
        base_weight(model, f"model.layers.{i}.{m}").nbytes
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")
    )
    assert 0 < handle.undo_bytes < 0.5 * full_copy, (handle.undo_bytes, full_copy)
    assert not any(isinstance(piece, torch.Tensor) for piece in fix_pieces(handle))  # no dense fall-back here
    handle.undo()
    assert bits(model) == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_huge_update_falls_back_to_dense_blocks_and_stays_exact(dtype, monkeypatch):
    monkeypatch.setattr(model_module, "_CHUNK_ELEMENTS", 100)
    model = build("lora", dtype)
    scale_lora_b_(model, 1e3)  # the update dwarfs the weights: most entries do not round-trip
    before = bits(model)
    handle = merge_crosslingual_into_base(model, cfg(t=1.3))
    pieces = fix_pieces(handle)
    assert any(isinstance(piece, torch.Tensor) for piece in pieces)  # dense copies of blocks
    assert handle.undo_bytes <= handle.weight_bytes  # never more than a full copy
    handle.undo()
    assert bits(model) == before


def test_signed_zero_and_nan_bits_are_restored():
    """Equality of values would miss -0.0 -> +0.0 (and NaN != NaN): the fix-up compares bits."""
    model = build("lora", torch.bfloat16)
    with torch.no_grad():
        weight = base_weight(model)
        weight[0, :8] = -0.0
        weight[1, 0] = float("nan")  # the user's NaN stays where it was (and is not checked against)
    before = bits(model)
    scale_lora_b_(model, 1e-2)
    after_scale = bits(model)
    assert {k: v for k, v in before.items() if ".lora_" not in k} == {
        k: v for k, v in after_scale.items() if ".lora_" not in k
    }
    with pytest.raises(AdaMergeXError, match="NaN/Inf"):  # a NaN already in the weight is refused too
        merge_crosslingual_into_base(model, cfg(t=0.5))
    assert bits(model) == after_scale
    with torch.no_grad():
        weight[1, 0] = 0.0
    before = bits(model)
    handle = merge_crosslingual_into_base(model, cfg(t=0.5))
    assert not torch.equal(base_weight(model)[0, :8].view(torch.int16), before_row(before))
    handle.undo()
    assert bits(model) == before


def before_row(state) -> torch.Tensor:
    dtype, raw = state[f"base_model.model.{MODULE}.base_layer.weight"]
    return torch.frombuffer(bytearray(raw), dtype=torch.int16)[:8]


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_overflow_in_a_late_block_rolls_back_bit_for_bit(kind, monkeypatch):
    """The failing weight has blocks already written when a later block overflows: they come back exactly."""
    monkeypatch.setattr(model_module, "_CHUNK_ELEMENTS", 64)
    model = build(kind, torch.float16)
    with torch.no_grad():
        base_weight(model)[-1].fill_(torch.finfo(torch.float16).max / (1 if kind == "lora" else 2))
    before = bits(model)
    with pytest.raises(AdaMergeXError, match="NaN/Inf"):
        merge_crosslingual_into_base(model, cfg(t=1e3))
    assert bits(model) == before


@pytest.mark.parametrize(
    "change",
    [
        lambda m, sd: m.half(),
        lambda m, sd: m.double(),
        lambda m, sd: m.to(torch.bfloat16),
        lambda m, sd: m.load_state_dict(sd),
    ],
    ids=["half", "double", "to_bf16", "load_state_dict"],
)
@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_undo_refuses_weights_that_are_not_the_merged_ones(kind, change):
    model = build(kind)
    state_before_merge = {k: v.clone() for k, v in model.state_dict().items()}
    handle = merge_crosslingual_into_base(model, cfg(t=0.7))
    change(model, state_before_merge)
    now = bits(model)
    with pytest.raises(AdaMergeXError) as err:
        handle.undo()
    message = one_line(err)
    assert message.startswith("cannot undo: module 'model.layers.") and "nothing was changed" in message, message
    assert bits(model) == now
    assert handle.merged  # still refused next time, not half-undone
    with pytest.raises(AdaMergeXError, match="cannot undo"):
        handle.undo()


def test_undo_of_an_earlier_merge_is_refused_until_the_later_one_is_undone():
    model = build("lora", torch.bfloat16)
    before = bits(model)
    first = merge_crosslingual_into_base(model, cfg(t=0.5))
    second = merge_crosslingual_into_base(model, cfg(t=-0.3))
    with pytest.raises(AdaMergeXError, match="weight values were changed"):
        first.undo()
    second.undo()
    first.undo()
    assert bits(model) == before


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_into_base_refused_while_peft_has_an_adapter_merged(kind):
    model = build(kind)
    model.set_adapter(T)
    model.merge_adapter()
    before = bits(model)
    with pytest.raises(AdaMergeXError) as err:
        merge_crosslingual_into_base(model, cfg())
    message = one_line(err)
    assert f"['{T}']" in message and "unmerge_adapter" in message, message
    assert bits(model) == before
    model.unmerge_adapter()
    merge_crosslingual_into_base(model, cfg()).undo()  # fine once unmerged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_undo_false_keeps_nothing_and_is_close(dtype):
    model = build("lora", dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for t in (0.9, -1.3, 2.0):
        handle = merge_crosslingual_into_base(model, cfg(t=t), exact_undo=False)
        assert handle.undo_bytes == 0 and all(item.fix is None for items in handle._entries for item in items)
        handle.undo()
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=3e-2, atol=2e-2)}[dtype]
    for key, value in model.state_dict().items():  # three cycles of round-off
        assert torch.allclose(value.float(), before[key].float(), **tol), key


def test_exact_undo_must_be_a_bool():
    model = build("lora")
    before = bits(model)
    with pytest.raises(AdaMergeXError, match="exact_undo must be True or False"):
        merge_crosslingual_into_base(model, cfg(), exact_undo="yes")
    assert bits(model) == before
    merge_crosslingual_into_base(model, cfg(), exact_undo=None).undo()  # the former spelling of the default
    assert bits(model) == before


def test_undo_repeats_the_merges_matmul_precision():
    """A float32 matmul precision changed between merge and undo is set back for the undo, then restored."""
    model = build("lora")
    before = bits(model)
    previous = torch.get_float32_matmul_precision()
    try:
        handle = merge_crosslingual_into_base(model, cfg(t=0.6))
        torch.set_float32_matmul_precision("medium")
        handle.undo()
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert bits(model) == before


# ---------------------------------------------------------------------------------- 5. adapter names
@pytest.mark.parametrize("name", ["q_proj", "self_attn", "weight", "lora_A", "base_layer", "layers", "0"])
def test_adapter_names_colliding_with_module_names_are_refused(name):
    model = build("lora")
    before, adapters = bits(model), sorted(model.peft_config)
    with pytest.raises(AdaMergeXError) as err:
        merge_crosslingual(model, cfg(), name)
    message = one_line(err)
    assert f"adapter_name {name!r} is also a module or parameter name" in message, message
    assert bits(model) == before and sorted(model.peft_config) == adapters


def test_failed_merge_restores_requires_grad(monkeypatch):
    model = build("lora")
    model.train()
    for param_name, param in model.named_parameters():
        if f".{T}." in param_name:
            param.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(flags.values())
    before, active = bits(model), list(model.active_adapters)

    def failing(*args, **kwargs):
        raise RuntimeError("simulated failure while loading the merged weights")

    monkeypatch.setattr(model_module, "set_peft_model_state_dict", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        merge_crosslingual(model, cfg(), "task_sw")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert bits(model) == before and "task_sw" not in model.peft_config and list(model.active_adapters) == active
