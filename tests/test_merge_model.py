"""merge_crosslingual / merge_crosslingual_into_base on PeftModels, against float64 closed forms."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer

import adamergex_peft  # noqa: F401  (attaches PeftModel.merge_crosslingual)
from adamergex_peft import AdaMergeXConfig, AdaMergeXError, merge_crosslingual, merge_crosslingual_into_base
from adamergex_peft import testing as tiny
from adamergex_peft.merge import AdapterWeights, merge_state_dicts

T, RS, RG = "task", "ref_en", "ref_sw"


def cfg(**kw) -> AdaMergeXConfig:
    return AdaMergeXConfig(task_adapter=T, source_reference_adapter=RS, target_reference_adapter=RG, **kw)


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def ia3_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Layer)}


def dw(layer, name, spec):
    """An adapter's update for one module in float64, in the base weight's orientation (0 if absent).

    The scaling comes from the adapter kwargs in ``spec`` (tiny.module_scaling), not from PEFT.
    """
    if name not in layer.lora_A:
        return 0.0
    module = next(k for k, m in layer_names(layer).items() if m is layer)
    scaling = tiny.module_scaling(spec, name, module)
    delta = scaling * (layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double())
    return delta.T if layer.fan_in_fan_out else delta


_NAMES: dict[int, dict] = {}


def layer_names(layer):
    return _NAMES[id(layer)]


def register_names(model):
    """Remember module names so that dw() can look up rank/alpha patterns by module path."""
    names = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for m in names.values():
        _NAMES[id(m)] = names


def expected_lora(layer, method, t, spec):
    d_t, d_g, d_s = (dw(layer, n, spec) for n in (T, RG, RS))
    return {
        "adamergex": d_t + t * (d_g - d_s),
        "task_only": d_t,
        "task_plus_target": d_t + t * d_g,
    }[method]


def rel(x, ref):
    ref = torch.as_tensor(ref, dtype=torch.float64)
    if ref.norm() == 0:
        return float(x.double().norm())
    return float((x.double() - ref).norm() / ref.norm())


def spec_model(base, spec):
    model = tiny.lora_model(base, spec)
    register_names(model)
    return model, spec


@pytest.fixture
def llama_lora():
    return spec_model(tiny.tiny_llama(), tiny.LLAMA_LORA)


@pytest.fixture
def gpt2_lora():
    return spec_model(tiny.tiny_gpt2(), tiny.GPT2_LORA)


@pytest.mark.parametrize("method", ["adamergex", "task_only", "task_plus_target"])
@pytest.mark.parametrize("t", [1.0, 0.35, -0.8])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_exact_equals_closed_form(method, t, arch, request):
    model, spec = request.getfixturevalue(f"{arch}_lora")
    snapshot = tiny.adapter_snapshot(model)
    assert model.merge_crosslingual(cfg(t=t, method=method), adapter_name="merged") == "merged"

    new_state = model.state_dict()
    for key, value in snapshot.items():  # sources and base weights are bit-identical
        assert torch.equal(new_state[key], value), key
    assert model.active_adapters == [T]  # not activated, like add_weighted_adapter
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".merged." in n)

    used = {"adamergex": (T, RG, RS), "task_only": (T,), "task_plus_target": (T, RG)}[method]
    checked = 0
    for name, layer in lora_layers(model).items():
        present = [n for n in used if n in layer.lora_A]
        if not present:
            assert "merged" not in layer.lora_A, f"{name}: merged adapter on a module no used adapter trains"
            continue
        ref = expected_lora(layer, method, t, spec)
        assert rel(layer.get_delta_weight("merged"), ref) < 1e-5, name
        # exact = stacked factors; a module in fewer adapters is zero-padded to the common rank
        assert layer.lora_A["merged"].weight.shape[0] == max(
            sum(other.lora_A[n].weight.shape[0] for n in used if n in other.lora_A)
            for other in lora_layers(model).values()
        )
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_merged_logits_equal_base_plus_update(arch, request):
    model, spec = request.getfixturevalue(f"{arch}_lora")
    t = 0.6
    reference = copy.deepcopy(model.get_base_model())  # base weights plus the float64 update, by hand
    base_of_ref = {n: m for n, m in reference.named_modules()}
    for name, layer in lora_layers(model).items():
        if any(n in layer.lora_A for n in (T, RG, RS)):
            target = base_of_ref[name.removeprefix("base_model.model.")]
            weight = target.base_layer.weight if hasattr(target, "base_layer") else target.weight
            with torch.no_grad():
                weight.copy_((weight.double() + expected_lora(layer, "adamergex", t, spec)).float())
    ids = torch.randint(3, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model.merge_crosslingual(cfg(t=t), "merged")
    model.set_adapter("merged")
    with torch.no_grad():
        got = model(ids).logits
        # the reference keeps PEFT wrappers (deepcopy of the injected base), so switch them off
        with model.disable_adapter():
            base = model(ids).logits
        for module in reference.modules():
            if isinstance(module, LoraLayer):
                module._disable_adapters = True
        want = reference(ids).logits
    assert (got - base).abs().max() > 1e-3  # the update matters
    assert (got - want).abs().max() < 1e-4


def test_svd_rank_energy_and_exactness(llama_lora):
    model, spec = llama_lora
    # enough rank: equals exact
    model.merge_crosslingual(cfg(t=0.5, lora_strategy="svd", svd_rank=12), "svd_full")
    for _name, layer in lora_layers(model).items():
        if "svd_full" in layer.lora_A:
            assert layer.lora_A["svd_full"].weight.shape[0] == 12
            assert rel(layer.get_delta_weight("svd_full"), expected_lora(layer, "adamergex", 0.5, spec)) < 1e-5
    # default rank = task rank (4): the best rank-4 approximation, with the kept energy reported
    model.merge_crosslingual(cfg(t=0.5, lora_strategy="svd"), "svd4")
    for _name, layer in lora_layers(model).items():
        if "svd4" in layer.lora_A:
            assert layer.lora_A["svd4"].weight.shape[0] == 4
            ref = expected_lora(layer, "adamergex", 0.5, spec)
            u, s, vh = torch.linalg.svd(ref)
            best = (u[:, :4] * s[:4]) @ vh[:4]
            assert rel(layer.get_delta_weight("svd4"), best) < 1e-4
    adapters = [AdapterWeights(n, model.peft_config[n], _sd(model, n)) for n in (T, RS, RG)]
    report = merge_state_dicts(*adapters, cfg(t=0.5, lora_strategy="svd")).report
    assert report["rank"] == 4
    kept = report["svd_kept_energy"]
    assert len(kept) == report["modules"] and all(0 < v <= 1 + 1e-6 for v in kept.values())
    assert report["svd_kept_energy_min"] < 1.0  # rank 4 < stacked rank 12: something is lost


def _sd(model, name):
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def test_factorwise_is_the_official_code():
    model = tiny.lora_model(tiny.tiny_llama(), tiny.LLAMA_LORA_UNIFORM)
    t = 0.7
    model.merge_crosslingual(cfg(t=t, lora_strategy="factorwise"), "fw")
    assert model.peft_config["fw"].r == 4
    for name, layer in lora_layers(model).items():
        if "fw" not in layer.lora_A:
            continue

        for which, mod in (("A", layer.lora_A), ("B", layer.lora_B)):

            def f(n, mod=mod):
                return mod[n].weight.double() if n in mod else 0.0

            ref = f(T) + t * (f(RG) - f(RS))
            assert rel(mod["fw"].weight, ref) < 1e-6, (name, which)
        # same scaling as the inputs (8 / 4 = 2): the product has the official code's cross terms
        assert layer.scaling["fw"] == pytest.approx(2.0)


def test_factorwise_needs_equal_ranks(llama_lora):
    model, _ = llama_lora
    snapshot = tiny.adapter_snapshot(model)
    with pytest.raises(AdaMergeXError, match="one rank and one scaling"):
        model.merge_crosslingual(cfg(lora_strategy="factorwise"), "fw")
    assert "fw" not in model.peft_config
    tiny.assert_unchanged(model, snapshot)


def test_arimerge_and_cross_lora_formulas():
    model = tiny.lora_model(tiny.tiny_llama(), tiny.LLAMA_LORA_UNIFORM)
    c0, c1, t = 0.3, 0.7, 0.9
    model.merge_crosslingual(cfg(method="arimerge", arimerge_weights=(c0, c1)), "ari")
    for layer in lora_layers(model).values():
        if "ari" not in layer.lora_A:
            continue

        def g(n, d):
            return (
                d[n].weight.double() if n in d else torch.zeros_like(d[T].weight if T in d else d[RG].weight).double()
            )

        ref_a = c0 * g(T, layer.lora_A) + c1 * (g(RG, layer.lora_A) + g(RS, layer.lora_A))
        ref_b = c0 * g(T, layer.lora_B) + c1 * (g(RG, layer.lora_B) - g(RS, layer.lora_B))
        assert rel(layer.lora_A["ari"].weight, ref_a) < 1e-6
        assert rel(layer.lora_B["ari"].weight, ref_b) < 1e-6
    # cross needs the module in all three adapters: o_proj is only in ref_sw
    with pytest.raises(AdaMergeXError, match="o_proj.*all three adapters"):
        model.merge_crosslingual(cfg(method="cross", t=t), "cross")
    assert "cross" not in model.peft_config


def test_cross_lora_formula_when_modules_match():
    uniform = dict(tiny.LLAMA_LORA_UNIFORM)
    uniform["ref_sw"] = uniform["ref_en"]
    model = tiny.lora_model(tiny.tiny_llama(), uniform)
    t = 0.9
    model.merge_crosslingual(cfg(method="cross", t=t), "cross")
    for layer in lora_layers(model).values():
        for d in (layer.lora_A, layer.lora_B):
            if "cross" in d:
                x_t, x_g, x_s = (d[n].weight.double() for n in (T, RG, RS))
                assert rel(d["cross"].weight, x_t * (t * (x_g / x_s - 1) + 1)) < 1e-5


@pytest.fixture
def llama_ia3():
    return tiny.ia3_model(tiny.tiny_llama(), tiny.LLAMA_IA3)


def vec(layer, name):
    """An (IA)^3 vector in float64; a module missing from the adapter counts as ones."""
    if name in layer.ia3_l:
        return layer.ia3_l[name].double()
    other = next(iter(layer.ia3_l.values()))
    return torch.ones_like(other, dtype=torch.float64)


@pytest.mark.parametrize(
    ("method", "strategy", "formula"),
    [
        ("adamergex", "linear", lambda lt, lg, ls, t: lt * (t * (lg / ls - 1) + 1)),
        ("adamergex", "power", lambda lt, lg, ls, t: lt * (lg / ls) ** t),
        ("task_only", "linear", lambda lt, lg, ls, t: lt),
        ("task_plus_target", "linear", lambda lt, lg, ls, t: lt * (t * (lg - 1) + 1)),
        ("task_plus_target", "power", lambda lt, lg, ls, t: lt * lg**t),
        ("cross", "linear", lambda lt, lg, ls, t: lt + t * (lg - ls)),
        ("arimerge", "linear", lambda lt, lg, ls, t: (1 - 0.3) + 0.3 * lt + 0.7 * (lg - ls)),
    ],
)
def test_ia3_formulas(llama_ia3, method, strategy, formula):
    model = llama_ia3
    t = 0.65
    snapshot = tiny.adapter_snapshot(model)
    extra = {"arimerge_weights": (0.3, 0.7)} if method == "arimerge" else {}
    model.merge_crosslingual(cfg(t=t, method=method, ia3_strategy=strategy, **extra), "merged")
    new_state = model.state_dict()
    for key, value in snapshot.items():
        assert torch.equal(new_state[key], value), key
    kinds = set()
    used = {"task_only": (T,), "task_plus_target": (T, RG)}.get(method, (T, RG, RS))
    for name, layer in ia3_layers(model).items():
        if not any(n in layer.ia3_l for n in used):
            assert "merged" not in layer.ia3_l
            continue
        ref = formula(vec(layer, T), vec(layer, RG), vec(layer, RS), t)
        assert rel(layer.ia3_l["merged"], ref) < 1e-6, name
        kinds.add(layer.is_feedforward)
    assert kinds == {True, False}  # both feed-forward and attention modules were checked
    assert set(model.peft_config["merged"].feedforward_modules) == {
        n.removeprefix("base_model.model.")
        for n, m in ia3_layers(model).items()
        if "merged" in m.ia3_l and m.is_feedforward
    }


def test_ia3_zero_denominator_is_refused_and_nothing_changes(llama_ia3):
    model = llama_ia3
    layer = model.base_model.model.model.layers[1].self_attn.k_proj
    with torch.no_grad():
        layer.ia3_l[RS][3, 0] = 0.0
    snapshot = tiny.adapter_snapshot(model)
    with pytest.raises(AdaMergeXError, match=r"layers\.1\.self_attn\.k_proj.*denominator.*'ref_en'"):
        model.merge_crosslingual(cfg(), "merged")
    assert "merged" not in model.peft_config
    tiny.assert_unchanged(model, snapshot)
    with torch.no_grad():
        layer.ia3_l[RS][3, 0] = -0.4  # sign change
    with pytest.raises(AdaMergeXError, match="denominator"):
        model.merge_crosslingual(cfg(ia3_strategy="power"), "merged")
    assert "merged" not in model.peft_config


def test_bad_input_leaves_model_untouched(llama_lora):
    model, _ = llama_lora
    snapshot = tiny.adapter_snapshot(model)
    with pytest.raises(AdaMergeXError, match="target_reference_adapter='nope'.*loaded adapters"):
        merge_crosslingual(model, AdaMergeXConfig(T, RS, "nope"), "merged")
    with pytest.raises(AdaMergeXError, match="already exists"):
        merge_crosslingual(model, cfg(), RS)
    with pytest.raises(AdaMergeXError, match="PeftModel"):
        merge_crosslingual(model.get_base_model(), cfg(), "merged")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B[RG].weight[0, 0] = float("nan")
    snapshot = tiny.adapter_snapshot(model)
    with pytest.raises(AdaMergeXError, match=r"'ref_sw'.*layers\.0\.self_attn\.q_proj\.lora_B.*NaN"):
        merge_crosslingual(model, cfg(), "merged")
    assert set(model.peft_config) == {T, RS, RG}
    assert model.active_adapters == [T]
    tiny.assert_unchanged(model, snapshot)


def test_dora_is_refused():
    model = tiny.lora_model(
        tiny.tiny_llama(),
        {T: {"r": 2, "target_modules": ["q_proj"], "use_dora": True}, RS: {"r": 2, "target_modules": ["q_proj"]}},
    )
    model.add_adapter(RG, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdaMergeXError, match="'task' is a DoRA adapter"):
        model.merge_crosslingual(cfg(), "merged")
    assert "merged" not in model.peft_config


def _model(kind: str, arch: str):
    base = tiny.tiny_llama() if arch == "llama" else tiny.tiny_gpt2()
    if kind == "lora":
        return tiny.lora_model(base, tiny.LLAMA_LORA if arch == "llama" else tiny.GPT2_LORA)
    return tiny.ia3_model(base, tiny.LLAMA_IA3 if arch == "llama" else tiny.GPT2_IA3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D (fan_in_fan_out) and biased attention
@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_into_base_equals_merged_adapter_and_undo_restores(kind, arch):
    model = _model(kind, arch)
    c = cfg(t=0.8)
    ids = torch.randint(3, tiny.VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    model.merge_crosslingual(c, "merged")
    adapters_before = tiny.adapter_snapshot(model)
    with torch.no_grad():
        model.set_adapter("merged")
        want = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
        handle = model.merge_crosslingual_into_base(c)
        with model.disable_adapter():
            got = model(ids).logits
        assert (want - base).abs().max() > 1e-3
        assert (got - want).abs().max() < 1e-4
        handle.undo()
        with model.disable_adapter():
            back = model(ids).logits
    assert (back - base).abs().max() < 1e-5
    after = model.state_dict()
    for key, value in adapters_before.items():
        if "base_layer" in key or not any(f".{n}" in key for n in (T, RS, RG, "merged")):
            assert torch.allclose(after[key], value, atol=1e-6), key
        else:
            assert torch.equal(after[key], value), key
    with pytest.raises(AdaMergeXError, match="already undone"):
        handle.undo()


def test_into_base_bf16_accumulates_in_fp32(monkeypatch):
    import adamergex_peft.model as model_module

    monkeypatch.setattr(model_module, "_CHUNK_ELEMENTS", 64)  # several row blocks per weight
    model, spec = spec_model(tiny.tiny_llama().to(torch.bfloat16), tiny.LLAMA_LORA)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w0 = layer.base_layer.weight.detach().clone()
    ref = (w0.double() + expected_lora(layer, "adamergex", 1.0, spec)).to(torch.bfloat16)
    handle = merge_crosslingual_into_base(model, cfg())
    w1 = layer.base_layer.weight
    assert w1.dtype == torch.bfloat16
    # one rounding to bf16 of the exact float64 result: at most one bf16 ulp away everywhere
    assert ((w1.double() - ref.double()).abs() <= ref.double().abs() * 2**-7 + 1e-30).all()
    handle.undo()


def test_saved_adapter_loads_in_plain_peft_and_reproduces_logits(tmp_path, llama_lora):
    model, _ = llama_lora
    model.merge_crosslingual(cfg(t=0.4), "task_sw")
    model.set_adapter("task_sw")
    out_dir = tmp_path / "out"
    ids = torch.randint(3, tiny.VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(str(out_dir), selected_adapters=["task_sw"])
    tiny.tiny_llama().save_pretrained(str(tmp_path / "base"))  # same seed: the same base weights
    adapter_dir = out_dir / "task_sw"
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    _check_fresh_process(tmp_path, adapter_dir, ids, want)


def _check_fresh_process(tmp_path, adapter_dir, ids, want):
    """Load base + adapter with plain PEFT in a new process that never imports adamergex_peft."""
    base_dir = tmp_path / "base"
    torch.save({"ids": ids, "want": want}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        data = torch.load({str(tmp_path / "io.pt")!r})
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r}).eval()
        with torch.no_grad():
            got = model(data["ids"]).logits
        assert "adamergex_peft" not in sys.modules
        print(float((got - data["want"]).abs().max()))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5


def test_into_base_bad_input_and_failure_leave_weights_unchanged(monkeypatch, llama_ia3):
    model = llama_ia3
    snapshot = tiny.adapter_snapshot(model)
    with pytest.raises(AdaMergeXError, match="loaded adapters"):
        merge_crosslingual_into_base(model, AdaMergeXConfig(T, RS, "nope"))
    layer = model.base_model.model.model.layers[0].self_attn.k_proj
    with torch.no_grad():  # a merged vector with a zero: l_T = 0 somewhere
        layer.ia3_l[T][1, 0] = 0.0
    snapshot = tiny.adapter_snapshot(model)
    with pytest.raises(AdaMergeXError, match=r"layers\.0\.self_attn\.k_proj.*zeros.*could not be undone"):
        merge_crosslingual_into_base(model, cfg())
    tiny.assert_unchanged(model, snapshot)

    import adamergex_peft.model as model_module

    lora = tiny.lora_model(tiny.tiny_llama(), tiny.LLAMA_LORA)
    before = tiny.adapter_snapshot(lora)
    calls = {"n": 0}
    real = model_module._merge_rows

    def failing(weight, op, *, exact):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated out of memory")
        return real(weight, op, exact=exact)

    monkeypatch.setattr(model_module, "_merge_rows", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        merge_crosslingual_into_base(lora, cfg())
    after = lora.state_dict()
    for key, value in before.items():  # the two weights already changed were restored, bit for bit
        assert torch.equal(after[key], value), key


def test_merged_adapter_keeps_the_task_adapter_dtype():
    base = tiny.tiny_llama().to(torch.bfloat16)
    model = tiny.lora_model(base, tiny.LLAMA_LORA)  # PEFT keeps adapters in float32 on a bf16 base
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A[T].weight.dtype == torch.float32
    model.merge_crosslingual(cfg(), "merged")
    assert layer.lora_A["merged"].weight.dtype == torch.float32
    assert layer.lora_A["merged"].weight.device == layer.lora_A[T].weight.device


def test_factorwise_needs_equal_scalings():
    spec = dict(tiny.LLAMA_LORA_UNIFORM)
    spec[RG] = {**spec[RG], "lora_alpha": 16}  # same rank, different alpha
    model = tiny.lora_model(tiny.tiny_llama(), spec)
    with pytest.raises(AdaMergeXError, match=r"one rank and one scaling.*'ref_sw'.*scaling 4"):
        model.merge_crosslingual(cfg(lora_strategy="factorwise"), "fw")
    assert "fw" not in model.peft_config


@pytest.mark.parametrize("name", ["a.b", ""])
def test_invalid_new_adapter_names(llama_lora, name):
    model, _ = llama_lora
    with pytest.raises(AdaMergeXError, match="adapter_name must be"):
        model.merge_crosslingual(cfg(), name)
    assert set(model.peft_config) == {T, RS, RG}


def test_saved_ia3_adapter_loads_in_plain_peft(tmp_path, llama_ia3):
    model = llama_ia3
    model.merge_crosslingual(cfg(t=0.7, ia3_strategy="power"), "task_sw")
    model.set_adapter("task_sw")
    ids = torch.randint(3, tiny.VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(str(tmp_path / "out"), selected_adapters=["task_sw"])
    tiny.tiny_llama().save_pretrained(str(tmp_path / "base"))
    _check_fresh_process(tmp_path, tmp_path / "out" / "task_sw", ids, want)


def test_exact_agrees_with_peft_cat_where_peft_is_exact():
    """An independent oracle: PEFT's add_weighted_adapter(cat) with weights [1, t, -t].

    (Without rsLoRA: PEFT 0.21.2 over-scales cat results of rsLoRA sources.)
    """
    spec = {name: {k: v for k, v in kw.items() if k != "use_rslora"} for name, kw in tiny.LLAMA_LORA.items()}
    model = tiny.lora_model(tiny.tiny_llama(), spec)
    t = 0.55
    model.merge_crosslingual(cfg(t=t), "ours")
    model.add_weighted_adapter([T, RG, RS], [1.0, t, -t], "peft_cat", combination_type="cat")
    checked = 0
    for layer in lora_layers(model).values():
        if "ours" in layer.lora_A:
            ours, theirs = layer.get_delta_weight("ours"), layer.get_delta_weight("peft_cat")
            assert rel(ours, theirs.double()) < 1e-5
            checked += 1
    assert checked > 0
