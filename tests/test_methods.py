"""The method registry: adding a method is one object, seen by the config, the CLI, the sweep and the engine."""

from __future__ import annotations

import pytest
import tiny
import torch
from peft.utils import get_peft_model_state_dict

from adamergex_peft import AdaMergeXConfig, AdaMergeXError
from adamergex_peft import config as config_module
from adamergex_peft.cli import build_parser
from adamergex_peft.merge import AdapterWeights, merge_state_dicts
from adamergex_peft.methods import (
    LINEAR_LORA,
    METHODS,
    MergeMethod,
    ia3_additive,
    register_method,
    registered,
    unregister_method,
)
from adamergex_peft.sweep import SweepPoint, plan_points

T, RS, RG = "task", "ref_en", "ref_sw"
NAMES = dict(task_adapter=T, source_reference_adapter=RS, target_reference_adapter=RG)

TASK_TWICE = MergeMethod(
    name="task_twice",
    reference="a toy method for the registry test: twice the task update",
    uses_t=False,
    roles=lambda t: {"T": 2.0},
    lora=LINEAR_LORA,
    ia3=ia3_additive,
    options={"lora_strategy": "exact", "svd_rank": None},
)


def _cli_args(method: str) -> list[str]:
    return ["merge", "--task-adapter", "a", "--source-reference", "b", "--target-reference", "c", "--output", "o"] + [
        "--method",
        method,
    ]


def test_builtin_methods_are_registered_with_their_t_use():
    assert list(METHODS)[:5] == ["adamergex", "cross", "arimerge", "task_only", "task_plus_target"]
    assert {m for m, method in METHODS.items() if not method.uses_t} == {"arimerge", "task_only"}
    assert all(method.reference for method in METHODS.values())
    assert tuple(config_module.METHODS) == tuple(METHODS)


def test_a_registered_method_reaches_config_cli_sweep():
    with pytest.raises(AdaMergeXError, match="task_twice") as excinfo:
        AdaMergeXConfig(**NAMES, method="task_twice")
    assert excinfo.value.field == "method"
    with pytest.raises(SystemExit):
        build_parser().parse_args(_cli_args("task_twice"))

    with registered(TASK_TWICE):
        assert AdaMergeXConfig(**NAMES, method="task_twice").method == "task_twice"
        assert "task_twice" in config_module.METHODS
        assert build_parser().parse_args(_cli_args("task_twice")).method == "task_twice"
        sweep_argv = ["sweep", "--base-model", "m", "--task-adapter", "a", "--source-reference", "b"]
        sweep_argv += ["--target-reference", "c", "--tasks", "x", "--output", "o", "--methods", "task_twice"]
        assert build_parser().parse_args(sweep_argv).methods == ["task_twice"]
        assert plan_points(["task_twice", "adamergex"], [0.0, 1.0]) == [
            SweepPoint("task_twice", None),
            SweepPoint("adamergex", 0.0),
            SweepPoint("adamergex", 1.0),
        ]
        assert plan_points(["task_twice"], []) == [SweepPoint("task_twice", None)]

    assert "task_twice" not in METHODS
    with pytest.raises(AdaMergeXError):
        AdaMergeXConfig(**NAMES, method="task_twice")


def test_register_refuses_duplicates_and_unregister_removes():
    with pytest.raises(ValueError, match="already registered"):
        register_method(METHODS["adamergex"])
    register_method(TASK_TWICE)
    try:
        assert METHODS["task_twice"] is TASK_TWICE
    finally:
        assert unregister_method("task_twice") is TASK_TWICE
    assert "task_twice" not in METHODS


def test_method_declaration_is_checked():
    with pytest.raises(ValueError, match="every strategy"):
        MergeMethod("bad", "x", True, lambda t: {"T": 1.0}, {"exact": LINEAR_LORA["exact"]}, ia3_additive)
    with pytest.raises(ValueError, match="roles"):
        MergeMethod("bad", "x", True, lambda t: {"X": 1.0}, LINEAR_LORA, ia3_additive)
    with pytest.raises(ValueError, match="unknown options"):
        MergeMethod("bad", "x", True, lambda t: {"T": 1.0}, LINEAR_LORA, ia3_additive, options={"nope": 1})


def _weights(model, name):
    return AdapterWeights(name, model.peft_config[name], get_peft_model_state_dict(model, adapter_name=name))


@pytest.mark.parametrize("strategy", ["exact", "svd"])
def test_toy_method_closed_form_through_the_engine(strategy):
    model = tiny.lora_model(tiny.tiny_llama(), tiny.LLAMA_LORA)
    adapters = [_weights(model, n) for n in (T, RS, RG)]
    with registered(TASK_TWICE):
        config = AdaMergeXConfig(**NAMES, method="task_twice", lora_strategy=strategy, svd_rank=4)
        result = merge_state_dicts(*adapters, config)
    task = adapters[0].state_dict
    modules = sorted({k[: -len(".lora_A.weight")] for k in task if k.endswith(".lora_A.weight")})
    assert sorted(result.peft_config.target_modules) == sorted(m[len("base_model.model.") :] for m in modules)
    assert result.peft_config.r == 4 and result.peft_config.lora_alpha == 4  # scaling 1
    for module in modules:
        a, b = task[module + ".lora_A.weight"].double(), task[module + ".lora_B.weight"].double()
        expected = 2.0 * tiny.module_scaling(tiny.LLAMA_LORA, T, module) * (b @ a)
        got = (
            result.state_dict[module + ".lora_B.weight"].double()
            @ result.state_dict[module + ".lora_A.weight"].double()
        )
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), module


def test_ignored_setting_warnings_follow_the_declared_options(caplog):
    model = tiny.lora_model(tiny.tiny_llama(), tiny.LLAMA_LORA_UNIFORM)
    adapters = [_weights(model, n) for n in (T, RS, RG)]

    def warnings_for(**settings) -> str:
        caplog.clear()
        with caplog.at_level("WARNING", logger="adamergex_peft.merge"):
            merge_state_dicts(*adapters, AdaMergeXConfig(**NAMES, **settings))
        return caplog.text

    assert "arimerge_weights=(0.3, 0.7) (method 'adamergex' does not read it)" in warnings_for(
        arimerge_weights=(0.3, 0.7)
    )
    assert warnings_for(method="arimerge", arimerge_weights=(0.3, 0.7)) == ""
    assert "lora_strategy='svd' (method 'arimerge' is factor-level)" in warnings_for(
        method="arimerge", lora_strategy="svd"
    )
    assert "ia3_strategy='power' (LoRA adapters)" in warnings_for(ia3_strategy="power")
    assert "svd_rank=2 (lora_strategy is not 'svd')" in warnings_for(svd_rank=2)
    with registered(TASK_TWICE):  # declares lora_strategy and svd_rank, not arimerge_weights
        assert warnings_for(method="task_twice", lora_strategy="svd", svd_rank=2) == ""
        assert "method 'task_twice' does not read it" in warnings_for(method="task_twice", arimerge_weights=(1, 1))
