"""`adamergex merge` front end: several target languages, the model card inside the publish, the config API."""

from __future__ import annotations

import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import adamergex_peft.files as files
from adamergex_peft import AdaMergeXConfig, AdaMergeXError, merge_adapter_files
from adamergex_peft import testing as tiny
from adamergex_peft.cli import main

T, RS, RG = "task", "ref_en", "ref_sw"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def dirs(tmp_path) -> dict[str, str]:
    """task / ref_en / ref_sw (LLAMA_LORA) and ref_th (ref_sw's settings, other random weights)."""
    model = tiny.lora_model(tiny.tiny_llama(), tiny.LLAMA_LORA)
    model.save_pretrained(str(tmp_path / "in"))
    th = tiny.lora_model(tiny.tiny_llama(), {"ref_th": tiny.LLAMA_LORA[RG]}, seed=5)
    th.save_pretrained(str(tmp_path / "in"))
    return {n: str(tmp_path / "in" / n) for n in (T, RS, RG, "ref_th")}


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, WEIGHTS))


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def base_argv(dirs, *targets) -> list[str]:
    return ["merge", "--task-adapter", dirs[T], "--source-reference", dirs[RS], "--target-reference", *targets]


def test_several_target_languages_read_the_task_and_source_once(dirs, tmp_path, monkeypatch):
    reads = []
    real = files._read_adapter_folder
    monkeypatch.setattr(files, "_read_adapter_folder", lambda path, name=None: reads.append(str(path)) or real(path))
    out = tmp_path / "out"
    argv = base_argv(dirs, f"sw={dirs[RG]}", f"th={dirs['ref_th']}")
    assert main([*argv, "--output", str(out), "--t", "0.6", "--source-language", "en"]) == 0
    assert sorted(reads) == sorted([dirs[T], dirs[RS], dirs[RG], dirs["ref_th"]])  # each folder read once
    assert sorted(os.listdir(out)) == ["sw", "th"]

    for lang, ref in (("sw", dirs[RG]), ("th", dirs["ref_th"])):
        single = merge_adapter_files(
            dirs[T], dirs[RS], ref, tmp_path / f"single_{lang}", AdaMergeXConfig("a", "b", "c", t=0.6)
        )
        assert same(weights(out / lang), weights(single)), lang
        record = json.loads((out / lang / "adamergex_config.json").read_text())
        assert record["config"]["target_reference_adapter"] == ref
        assert record["output"]["target_language"] == lang
        card = ModelCard.load(out / lang / "README.md")
        assert card.data.language == ["en", lang] and card.data.library_name == "peft"
    assert not same(weights(out / "sw"), weights(out / "th"))
    assert [n for n in os.listdir(out) if n.startswith(".")] == []

    # the Python API: a mapping, returned as {lang: folder}
    api = merge_adapter_files(
        dirs[T],
        dirs[RS],
        {"sw": dirs[RG], "th": dirs["ref_th"]},
        tmp_path / "api",
        AdaMergeXConfig("a", "b", "c", t=0.6),
    )
    assert api == {"sw": tmp_path / "api" / "sw", "th": tmp_path / "api" / "th"}
    assert same(weights(api["th"]), weights(out / "th"))
    assert not (api["sw"] / "README.md").exists()  # the API writes a card when asked (model_card=True)


def test_a_failing_language_keeps_the_others(dirs, tmp_path, capsys):
    broken = tmp_path / "broken_th"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(open(os.path.join(dirs["ref_th"], "adapter_config.json")).read())
    data = open(os.path.join(dirs["ref_th"], WEIGHTS), "rb").read()
    (broken / WEIGHTS).write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert main([*base_argv(dirs, f"th={broken}", f"sw={dirs[RG]}"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "1 of 2 target languages failed (written and kept: sw)" in err
    assert "th: adapter" in err and "corrupt" in err
    assert sorted(os.listdir(out)) == ["sw"]  # sw published, th left nothing (no temporary folder either)
    assert (out / "sw" / WEIGHTS).is_file()

    # an existing output of any language is refused before anything is read or written
    before = sorted(os.listdir(out))
    assert main([*base_argv(dirs, f"th={dirs['ref_th']}", f"sw={dirs[RG]}"), "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and sorted(os.listdir(out)) == before
    assert not (out / "th").exists()


def test_target_reference_parsing_errors(dirs, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main([*base_argv(dirs, f"sw={dirs[RG]}", dirs["ref_th"]), "--output", out]) == 2
    assert "each must be LANG=DIR" in capsys.readouterr().err
    assert main([*base_argv(dirs, f"sw={dirs[RG]}", f"sw={dirs['ref_th']}"), "--output", out]) == 2
    assert "'sw' is given twice" in capsys.readouterr().err
    argv = [*base_argv(dirs, f"sw={dirs[RG]}", f"th={dirs['ref_th']}"), "--output", out, "--target-language", "sw"]
    assert main(argv) == 2
    assert "taken from the keys" in capsys.readouterr().err
    with pytest.raises(AdaMergeXError, match="cannot name an output folder"):
        merge_adapter_files(dirs[T], dirs[RS], {"../x": dirs[RG]}, out)
    assert not os.path.exists(out)


def test_card_is_part_of_the_published_folder(dirs, tmp_path, monkeypatch, capsys):
    import adamergex_peft.card as card

    out = tmp_path / "out"
    argv = [*base_argv(dirs, dirs[RG]), "--output", str(out), "--target-language", "sw"]
    real = card.build_model_card

    def broken(*args, **kwargs):
        raise OSError("card failed")

    monkeypatch.setattr(card, "build_model_card", broken)
    assert main(argv) == 2
    assert "card failed" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["in"]  # no output, no temporary folder: the card is inside the publish
    monkeypatch.setattr(card, "build_model_card", real)

    assert main(argv) == 0
    assert sorted(os.listdir(out)) == ["README.md", "adamergex_config.json", "adapter_config.json", WEIGHTS]
    text = (out / "README.md").read_text()
    assert str(out) in text and ".amx-" not in text  # the card names the final folder, not the temporary one
    assert ModelCard.load(out / "README.md").data.language == ["sw"]

    assert main([*base_argv(dirs, dirs[RG]), "--output", str(tmp_path / "nocard"), "--no-card"]) == 0
    assert "README.md" not in os.listdir(tmp_path / "nocard")
    argv = [*base_argv(dirs, dirs[RG]), "--output", str(tmp_path / "x"), "--no-card", "--card-results", __file__]
    assert main(argv) == 2 and "needs a model card" in capsys.readouterr().err


def test_the_config_names_the_folders(dirs, tmp_path):
    config = AdaMergeXConfig(dirs[T], dirs[RS], dirs[RG], t=0.3)
    out = merge_adapter_files(output_dir=tmp_path / "from_config", config=config)
    positional = merge_adapter_files(
        dirs[T], dirs[RS], dirs[RG], tmp_path / "positional", AdaMergeXConfig("a", "b", "c", t=0.3)
    )
    assert same(weights(out), weights(positional))
    record = json.loads((out / "adamergex_config.json").read_text())
    assert record["config"]["task_adapter"] == dirs[T]
    # a folder argument replaces the config's
    other = merge_adapter_files(target_reference_dir=dirs["ref_th"], output_dir=tmp_path / "th", config=config)
    assert (
        json.loads((other / "adamergex_config.json").read_text())["config"]["target_reference_adapter"]
        == dirs["ref_th"]
    )
    with pytest.raises(AdaMergeXError, match="needs the task_adapter folder"):
        merge_adapter_files(output_dir=tmp_path / "x")
    with pytest.raises(AdaMergeXError, match="needs output_dir"):
        merge_adapter_files(config=config)
