"""Adapter training: recipes, prompt masking, loss that drops, loadable PEFT folders, resume, CLI."""

from __future__ import annotations

import json
import os

import pytest

from adamergex_peft.train import (
    IGNORE_INDEX,
    TrainConfig,
    list_recipes,
    load_recipe,
    resolve_config,
    tokenize_causal,
    tokenize_examples,
    train_adapter,
)

WORDS = "ana bo kim eat read play apple book song red old new big the a likes".split()


def _sentences(n: int = 64) -> list[str]:
    out = []
    for i in range(n):
        out.append(f"{WORDS[i % 3]} {WORDS[3 + i % 3]} the {WORDS[9 + i % 4]} {WORDS[6 + i % 3]}")
    return out


@pytest.fixture(scope="module")
def tokenizer():
    from adamergex_peft.demo.tokenizer import build_word_tokenizer

    return build_word_tokenizer([" ".join(WORDS) + " answer : yes no"])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    from adamergex_peft.demo.lm import TinyLMSize, build_tiny_llama

    # A random model's frozen output layer is nearly flat at the usual init (0.02): a large init
    # lets an adapter move the logits without pretraining the base first.
    size = TinyLMSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, initializer_range=0.3)
    path = tmp_path_factory.mktemp("base")
    model = build_tiny_llama(tokenizer, size)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _task_rows(n: int = 48) -> list[dict]:
    return [{"prompt": f"{s} answer :", "completion": " yes" if i % 2 else " no"} for i, s in enumerate(_sentences(n))]


def test_recipes_ship_and_resolve():
    names = list_recipes()
    for name in ("llama2-7b-lora", "t5-ia3", "cpu-small-lora", "cpu-small-ia3"):
        assert name in names and names[name]
    paper = resolve_config("llama2-7b-lora")
    assert (paper.lora_r, paper.lora_alpha, paper.lora_dropout) == (8, 16, 0.05)
    assert set(paper.lora_target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert (paper.learning_rate, paper.per_device_train_batch_size, paper.gradient_accumulation_steps) == (2e-4, 4, 2)
    assert (paper.lr_scheduler_type, paper.warmup_ratio, paper.max_grad_norm, paper.max_length) == (
        "cosine",
        0.05,
        0.3,
        1024,
    )
    assert paper.bf16 and paper.num_train_epochs == 3
    t5 = load_recipe("t5-ia3")
    assert t5["adapter"] == "ia3" and t5["learning_rate"] == 5e-4
    assert t5["per_device_train_batch_size"] * t5["gradient_accumulation_steps"] == 16
    # Flags win over the recipe; unknown settings and recipes are errors.
    cfg = resolve_config("llama2-7b-lora", {"learning_rate": 1e-3, "lora_r": None}, adapter="ia3")
    assert cfg.learning_rate == 1e-3 and cfg.lora_r == 8 and cfg.adapter == "ia3"
    with pytest.raises(ValueError, match="unknown training setting"):
        resolve_config(None, {"learnig_rate": 1})
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_config("no-such-recipe")
    with pytest.raises(ValueError):
        TrainConfig(adapter="prefix")


def test_task_mode_masks_the_prompt(tokenizer):
    item = tokenize_causal(
        tokenizer, "ana eat the apple answer :", " yes", max_length=64, loss_on="completion", add_eos=True
    )
    ids, labels = item["input_ids"], item["labels"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<s>", "ana", "eat", "the", "apple", "answer", ":", "yes", "</s>"]
    assert labels == [IGNORE_INDEX] * 7 + ids[7:]
    # Reference mode (loss on everything, no EOS) labels every token.
    ref = tokenize_causal(tokenizer, "ana eat the", " apple", max_length=64, loss_on="all", add_eos=False)
    assert ref["labels"] == ref["input_ids"] and ref["input_ids"][-1] != tokenizer.eos_token_id
    # Too long: the end is kept when only the completion counts.
    cut = tokenize_causal(
        tokenizer, "ana eat the apple answer :", " yes", max_length=4, loss_on="completion", add_eos=True
    )
    assert tokenizer.convert_ids_to_tokens(cut["input_ids"]) == ["answer", ":", "yes", "</s>"]
    assert cut["labels"] == [IGNORE_INDEX, IGNORE_INDEX] + cut["input_ids"][2:]
    # An empty completion in task mode leaves nothing to learn: skipped, then an error if all are.
    with pytest.raises(ValueError, match="no example"):
        tokenize_examples([{"prompt": "ana eat", "completion": ""}], tokenizer, TrainConfig(add_eos=False), "task")


@pytest.mark.parametrize("adapter", ["lora", "ia3"])
def test_training_lowers_the_loss_and_saves_a_loadable_adapter(tmp_path, base_dir, adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _task_rows()), encoding="utf-8")
    out = tmp_path / "adapter"
    result = train_adapter(
        str(base_dir),
        data,
        out,
        kind="task",
        recipe=f"cpu-small-{adapter}",
        overrides={"num_train_epochs": 8, "logging_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-2},
        progress=False,
    )
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    info = json.loads((out / "adamergex_training.json").read_text())
    assert info["kind"] == "task" and info["config"]["adapter"] == adapter
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.7 * first, result.losses
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, out)
    assert model.peft_config["default"].peft_type.value == adapter.upper()
    trained = [p for n, p in model.named_parameters() if ("lora_B" in n or "ia3_l" in n)]
    assert trained and any(
        not torch.allclose(p, torch.zeros_like(p) if adapter == "lora" else torch.ones_like(p)) for p in trained
    )


def test_model_object_is_restored_and_reference_kind(tmp_path, base_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"prompt": s, "completion": " ."} for s in _sentences(32)]
    torch.use_deterministic_algorithms(False)
    env_before = dict(os.environ)
    result = train_adapter(
        model,
        rows,
        tmp_path / "ref",
        kind="reference",
        tokenizer=tokenizer,
        recipe="cpu-small-lora",
        overrides={"logging_steps": 1, "full_determinism": True},
        progress=False,
    )
    assert result.num_examples == 32 and result.losses
    # Trainer(full_determinism=True) switches these on for the whole process: restored on return.
    assert not torch.are_deterministic_algorithms_enabled()
    assert {k: os.environ.get(k) for k in ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG")} == {
        k: env_before.get(k) for k in ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG")
    }
    after = model.state_dict()
    assert set(after) == set(before)  # no adapter layers left behind
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_from_checkpoint(tmp_path, base_dir):
    rows = _task_rows(32)
    common = {
        "max_steps": 4,
        "per_device_train_batch_size": 8,
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 1,
    }
    train_adapter(str(base_dir), rows, tmp_path / "a", recipe="cpu-small-lora", overrides=common, progress=False)
    assert (tmp_path / "a" / "checkpoints" / "checkpoint-4").is_dir()
    resumed = train_adapter(
        str(base_dir),
        rows,
        tmp_path / "a",
        recipe="cpu-small-lora",
        overrides={**common, "max_steps": 6},
        resume_from_checkpoint=True,
        progress=False,
    )
    assert resumed.global_step == 6
    assert [s for s, _ in resumed.losses if s <= 4] == [1, 2, 3, 4]  # history restored from the checkpoint


def test_train_cli(tmp_path, base_dir, capsys):
    from adamergex_peft.cli import main

    data = tmp_path / "ref.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": s, "completion": " ."}) + "\n" for s in _sentences(16)), encoding="utf-8"
    )
    out = tmp_path / "cli_adapter"
    argv = [
        "train",
        "--base-model",
        str(base_dir),
        "--data",
        str(data),
        "--kind",
        "reference",
        "--adapter",
        "ia3",
        "--output",
        str(out),
    ]
    argv += [
        "--recipe",
        "cpu-small-lora",
        "--max-steps",
        "2",
        "--lr",
        "0.01",
        "--set",
        "logging_steps=1",
        "--no-progress",
    ]
    assert main(argv) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3"
    info = json.loads((out / "adamergex_training.json").read_text())
    assert info["config"]["learning_rate"] == 0.01 and info["global_step"] == 2
    assert str(out) in capsys.readouterr().out
    assert (
        main(["train", "--base-model", str(base_dir), "--data", str(data), "--output", str(out), "--set", "nope=1"])
        == 2
    )


def test_encoder_decoder_ia3(tmp_path, tokenizer):
    """T5 (the paper's (IA)^3 backbone ablation): prompt -> encoder, completion -> labels."""
    from peft import PeftModel
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    result = train_adapter(
        str(tmp_path / "t5"), _task_rows(16), tmp_path / "t5_ia3", recipe="t5-ia3",
        overrides={"max_steps": 3, "logging_steps": 1, "save_strategy": "no"}, progress=False,
    )  # fmt: skip
    assert result.global_step == 3 and len(result.losses) == 3
    cfg = json.loads((tmp_path / "t5_ia3" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["task_type"] == "SEQ_2_SEQ_LM"
    assert set(cfg["target_modules"]) == {"k", "v", "wo"}
    model = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(tmp_path / "t5"), tmp_path / "t5_ia3")
    assert any("ia3_l" in n for n, _ in model.named_parameters())
