"""Model cards: Hub metadata via huggingface_hub, read back with ModelCard.load; body facts; sweep table."""

from __future__ import annotations

import json

import peft
import pytest
import tiny
from huggingface_hub import ModelCard

from adamergex_peft import AdaMergeXConfig, AdaMergeXError, merge_adapter_files
from adamergex_peft.card import build_model_card, sweep_table, write_model_card

T, RS, RG = "task", "ref_en", "ref_sw"

SWEEP = {
    "settings": {"tasks": ["xnli_sw"], "num_fewshot": 0, "limit": 50},
    "points": [
        {
            "key": "task_only",
            "method": "task_only",
            "t": None,
            "score": 0.41,
            "chosen": {"xnli_sw": {"metric": "acc", "value": 0.41}},
        },
        {
            "key": "adamergex@0.5",
            "method": "adamergex",
            "t": 0.5,
            "score": 0.47,
            "chosen": {"xnli_sw": {"metric": "acc", "value": 0.47}},
        },
        {
            "key": "adamergex@1",
            "method": "adamergex",
            "t": 1.0,
            "score": 0.44,
            "chosen": {"xnli_sw": {"metric": "acc", "value": 0.44}},
        },
    ],
}


def merged_folder(tmp_path, kind: str, base_name: str | None = "org/tiny-base"):
    spec = tiny.LLAMA_LORA if kind == "lora" else tiny.LLAMA_IA3
    model = (tiny.lora_model if kind == "lora" else tiny.ia3_model)(tiny.tiny_llama(), spec)
    model.save_pretrained(tmp_path / "adapters")
    dirs = [tmp_path / "adapters" / n for n in (T, RS, RG)]
    for d in dirs:  # what a base loaded from the Hub would have recorded
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base_name
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    out = merge_adapter_files(*dirs, tmp_path / "merged", AdaMergeXConfig("a", "b", "c", t=0.6))
    return out, dirs


def test_lora_adapter_card_metadata_and_body(tmp_path):
    out, dirs = merged_folder(tmp_path, "lora")
    path = write_model_card(out, target_language="sw", source_language="en", repo_id="me/tiny-sw")
    assert path == out / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-base"
    assert data["library_name"] == "peft"
    assert data["tags"] == ["adamergex", "lora", "cross-lingual-transfer", "peft"]
    assert data["language"] == ["en", "sw"]
    record = json.loads((out / "adamergex_config.json").read_text())
    body = card.text
    for role in ("task_adapter", "source_reference_adapter", "target_reference_adapter"):
        assert record["inputs"][role]["weights_sha256"] in body
        assert record["inputs"][role]["path"] in body
    assert "method `adamergex`, t = 0.6, LoRA strategy `exact`" in body
    assert f"peft {peft.__version__}" in body
    assert "Merged rank: 12 over" in body
    assert 'PeftModel.from_pretrained(base, "me/tiny-sw")' in body
    assert "lm_eval --model hf --model_args pretrained=org/tiny-base,peft=me/tiny-sw" in body
    # exact merge of ranks 4 + 6 + 2 = 12 -> vLLM's next allowed rank is 16
    assert "vllm serve org/tiny-base --enable-lora --lora-modules adamergex=me/tiny-sw --max-lora-rank 16" in body
    assert "lora_local_path=me/tiny-sw,max_lora_rank=16" in body
    assert "@inproceedings{zhao2025adamergex" in body
    assert "## Evaluation" not in body


def test_ia3_card_local_base_and_sweep_table(tmp_path):
    out, _ = merged_folder(tmp_path, "ia3", base_name=str(tmp_path))  # a local path is not Hub metadata
    (tmp_path / "sweep_results.json").write_text(json.dumps(SWEEP))
    write_model_card(out, target_language="sw", sweep_results=tmp_path / "sweep_results.json")
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert "base_model" not in data
    assert data["tags"][:3] == ["adamergex", "ia3", "cross-lingual-transfer"]
    assert data["language"] == ["sw"]
    body = card.text
    assert "(IA)^3 strategy `linear`" in body
    assert "vllm serve" not in body and "serve LoRA adapters only" in body
    assert "| method | t | score | xnli_sw (acc) |" in body
    assert "| adamergex **(best)** | 0.5000 | 0.4700 | 0.4700 |" in body
    assert "| task_only |  | 0.4100 | 0.4100 |" in body
    assert "Sweep settings: tasks: ['xnli_sw'], num_fewshot: 0, limit: 50." in body


def test_full_model_card(tmp_path):
    from adamergex_peft.export import export_merged_model

    out, _ = merged_folder(tmp_path, "lora")
    base = tiny.tiny_llama()
    base.save_pretrained(tmp_path / "base")
    full = export_merged_model(tmp_path / "base", out, tmp_path / "full")
    card = build_model_card(full, target_language="sw", repo_id="me/tiny-sw-full")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["base_model"] == "org/tiny-base"  # the adapters' base, from the export record
    assert "lora" in data["tags"] and "merged-adapter" in data["tags"]
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-sw-full")' in card.text
    assert "lm_eval --model hf --model_args pretrained=me/tiny-sw-full" in card.text
    assert "dtype base" in card.text and "t = 0.6" in card.text
    card.save(full / "README.md")
    assert ModelCard.load(full / "README.md").data.to_dict()["library_name"] == "transformers"


def test_sweep_table_without_points_and_bad_folder(tmp_path):
    assert sweep_table({"settings": {}, "points": []}) == "_The sweep has no evaluated points._"
    with pytest.raises(AdaMergeXError, match="neither adapter_config.json nor config.json"):
        build_model_card(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_multi_language_sweep_gets_one_table_per_language(tmp_path):
    def point(lang, method, t, score):
        task = f"xcopa_{lang}"
        return {
            "lang": lang,
            "method": method,
            "t": t,
            "score": score,
            "chosen": {task: {"metric": "acc", "value": score}},
        }

    sweep = {
        "settings": {"tasks": ["xcopa_{lang}"]},
        "points": [point("sw", "task_only", None, 0.5), point("sw", "adamergex", 1.0, 0.6)]
        + [point("th", "task_only", None, 0.7), point("th", "adamergex", 1.0, 0.55)],
    }
    both = sweep_table(sweep)
    assert "Target language `sw`:" in both and "Target language `th`:" in both
    assert "| method | t | score | xcopa_sw (acc) |" in both and "| method | t | score | xcopa_th (acc) |" in both
    assert "xcopa_th (acc) | xcopa_sw" not in both  # no shared table with empty cells
    # the best is per language
    assert "| adamergex **(best)** | 1.0000 | 0.6000 | 0.6000 |" in both
    assert "| task_only **(best)** |  | 0.7000 | 0.7000 |" in both
    only_th = sweep_table(sweep, lang="th")
    assert "xcopa_sw" not in only_th and "Target language `th`:" in only_th
    assert sweep_table(sweep, lang="vi") == both  # a language the sweep does not have: every table

    # the card of the sw adapter shows the sw table
    out, _ = merged_folder(tmp_path, "lora")
    (tmp_path / "sweep_results.json").write_text(json.dumps(sweep))
    write_model_card(out, target_language="sw", sweep_results=tmp_path / "sweep_results.json")
    body = ModelCard.load(out / "README.md").text
    assert "xcopa_sw (acc)" in body and "xcopa_th" not in body
