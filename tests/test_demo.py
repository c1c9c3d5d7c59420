"""`adamergex demo`: the synthetic world, and the whole pipeline end to end (quick and reduced sizes)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from adamergex_peft.demo.lm import TinyLMSize
from adamergex_peft.demo.pipeline import CHART_PNG, MERGE_METHODS, QUICK, RESULTS_JSON, TABLE_TXT, run_demo
from adamergex_peft.demo.world import NAMES, TOPICS, build_languages, sample_meanings, task_examples

ORIGINAL_ENV = dict(os.environ)
TINY = replace(
    QUICK,
    pretrain_sentences=300,
    reference_sentences=200,
    window_size=16,
    reference_windows=10,
    task_train=32,
    task_test=16,
    lm=TinyLMSize(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
)


def test_world_languages_share_meanings_not_words():
    src, tga, tgb = build_languages(num_targets=2, seed=0)
    assert (src.order, tga.order, tgb.order) == ("SVO", "SOV", "VSO")
    for target in (tga, tgb):
        # Own vocabulary: no word shared with the source except names and punctuation.
        assert src.vocabulary() & target.vocabulary() == set(NAMES) | {".", ":"}
    meanings = list(sample_meanings(50, seed=3))
    for m in meanings:
        rendered = [lang.render(m) for lang in (src, tga, tgb)]
        assert len(set(rendered)) == 3 and all(m.subject in r.split() for r in rendered)
    plural = next(m for m in meanings if m.plural and not m.topic_only)
    noun = tga.word(plural.obj)
    assert noun + "ru" in tga.render(plural).split()  # tgA marks plural on the noun
    # Task data is parallel: the same labels in every language, choices in the language's own words.
    rows = {lang.code: task_examples(lang, 20, seed=5) for lang in (src, tga, tgb)}
    assert [r["label"] for r in rows["src"]] == [r["label"] for r in rows["tgA"]] == [r["label"] for r in rows["tgB"]]
    assert rows["src"][0]["choices"] == list(TOPICS)
    assert rows["tgA"][0]["choices"] == tga.topic_words()
    for r in rows["tgB"]:
        assert r["completion"] == " " + r["choices"][r["label"]]
    assert build_languages(2, seed=0) == build_languages(2, seed=0)
    with pytest.raises(ValueError):
        build_languages(0)


def test_demo_cli_quick_end_to_end(tmp_path, capsys, monkeypatch):
    import warnings

    from adamergex_peft.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # keep this process's threads
    from adamergex_peft.commands.demo import NOISY_WARNINGS

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    # The demo's warning filters were scoped to the run, and there never was an ignore-everything filter.
    noisy = {module for _category, module in NOISY_WARNINGS}
    assert not [f for f in warnings.filters if getattr(f[3], "pattern", f[3]) in noisy]
    assert ("ignore", None, Warning, None, 0) not in warnings.filters
    printed = capsys.readouterr().out
    for method in (*MERGE_METHODS, "oracle", "base (no adapter)"):
        assert method in printed
    assert "gap closed" in printed and "LoRA" in printed and "(IA)^3" in printed
    data = json.loads((out / RESULTS_JSON).read_text())
    assert data["targets"] == ["tgA"] and data["source"] == "src"
    for family in ("lora", "ia3"):
        assert list(data["scores"][family]) == ["base (no adapter)", *MERGE_METHODS, "oracle"]
        for per_lang in data["scores"][family].values():
            assert 0.0 <= per_lang["tgA"] <= 1.0
    assert {(r["family"], r["method"]) for r in data["table"]} >= {("lora", "adamergex"), ("ia3", "adamergex")}
    assert (out / CHART_PNG).read_bytes()[:4] == b"\x89PNG"
    assert (out / TABLE_TXT).read_text().splitlines()[0].split()[:2] == ["adapter", "method"]
    # The adapters are standard PEFT folders written by the same code as `adamergex train`.
    for name in ("task", "ref_src", "ref_tgA", "oracle_tgA"):
        assert (out / "adapters" / "lora" / name / "adapter_config.json").is_file()
        assert (out / "adapters" / "ia3" / name / "adamergex_training.json").is_file()
    # Every merge of one (family, language) is recorded in one sweep file, in the table's order.
    sweep = json.loads((out / "eval" / "lora_tgA" / "sweep_results.json").read_text())
    assert [p["method"] for p in sweep["points"]] == list(MERGE_METHODS)


def test_demo_is_reproducible(tmp_path):
    """Same seed, same numbers; and the run leaves torch's global settings and matplotlib's backend as they were."""
    import matplotlib
    import torch

    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # raw: reading it normally would resolve it
    torch.use_deterministic_algorithms(False)
    first = run_demo(tmp_path / "a", size=TINY, seed=3)
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ or "CUBLAS_WORKSPACE_CONFIG" in ORIGINAL_ENV
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend  # no matplotlib.use("Agg")
    second = run_demo(tmp_path / "b", size=TINY, seed=3)
    assert first.scores == second.scores
    assert first.training == second.training
    from adamergex_peft.demo.report import format_table

    assert format_table(first) == format_table(second)


def test_text_dir_layout_is_checked(tmp_path):
    (tmp_path / "en.txt").write_text("a b c\n", encoding="utf-8")
    with pytest.raises(OSError, match="en.train.jsonl"):
        run_demo(tmp_path / "out", size=TINY, text_dir=tmp_path, source="en", targets=["sw"])
    with pytest.raises(ValueError, match="source-lang"):
        run_demo(tmp_path / "out", size=TINY, text_dir=tmp_path)


def test_own_data_folder_and_base_model(tmp_path):
    """--text-dir and --base-model: the same pipeline on a given folder and model (no pretraining)."""
    from adamergex_peft.demo.lm import build_tiny_llama
    from adamergex_peft.demo.pipeline import read_lines, write_synthetic_world
    from adamergex_peft.demo.tokenizer import build_word_tokenizer

    size = replace(TINY, families=("lora",))
    source, targets = write_synthetic_world(tmp_path / "mydata", size, seed=1)
    lines = [line for lang in (source, *targets) for line in read_lines(tmp_path / "mydata" / f"{lang}.txt")]
    lines += [
        json.loads(x)["prompt"] + json.loads(x)["completion"]
        for x in (tmp_path / "mydata" / f"{targets[0]}.train.jsonl").open()
    ]
    lines += [
        json.loads(x)["prompt"] + json.loads(x)["completion"]
        for x in (tmp_path / "mydata" / f"{source}.train.jsonl").open()
    ]
    tokenizer = build_word_tokenizer(lines)
    build_tiny_llama(tokenizer, size.lm).save_pretrained(tmp_path / "mybase")
    tokenizer.save_pretrained(tmp_path / "mybase")
    result = run_demo(
        tmp_path / "out",
        size=size,
        base_model=str(tmp_path / "mybase"),
        text_dir=tmp_path / "mydata",
        source=source,
        targets=targets,
    )
    assert result.settings["base_model"] == str(tmp_path / "mybase") and set(result.scores) == {"lora"}
    assert result.training["pretrain_losses"] == [] and not (tmp_path / "out" / "base_model").exists()
    assert not (tmp_path / "out" / "world").exists()  # the given folder is used as is


@pytest.mark.slow
def test_full_demo(tmp_path):
    result = run_demo(tmp_path / "full")
    assert result.targets == ["tgA", "tgB"]
    assert set(result.scores) == {"lora", "ia3"}
    assert (tmp_path / "full" / RESULTS_JSON).is_file()
