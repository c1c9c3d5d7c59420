"""Several target languages in one sweep (issue 11.1): one model load, a languages x (method, t) grid."""

from __future__ import annotations

import csv
import io
import json

import pytest

from adamergex_peft import testing
from adamergex_peft.sweep import (
    HEATMAP_PNG,
    PLOT_PNG,
    RESULTS_CSV,
    RESULTS_JSON,
    TABLE_CSV,
    TABLE_MD,
    parse_target_references,
    plan_points,
    run_sweep,
    tasks_for_lang,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ml_setup(tmp_path_factory):
    """A tiny base model, a task adapter, a source reference, two target references, one task per language."""
    root = tmp_path_factory.mktemp("sweep_langs")
    testing.topic_sweep_models(root, ("task", "ref_src", "ref_sw", "ref_th"), seed=300)
    objects = {"sw": ("apple", "book", "food"), "th": ("study", "topic", "apple", "book")}
    for lang, objs in objects.items():
        rows = testing.topic_rows(objs)
        testing.write_jsonl(rows, root / f"{lang}.jsonl")
        testing.write_task_yaml(
            root / "tasks",
            f"adamergex_ml_sweeptest_{lang}",
            root / f"{lang}.jsonl",
            doc_to_text="prompt",
            doc_to_choice="choices",
            doc_to_target="label",
            target_delimiter=" ",
        )
    return root


def _run(root, out, targets, tasks=("adamergex_ml_sweeptest_{lang}",), t_values=(0.0, 1.0), **kwargs):
    return run_sweep(
        str(root / "base"),
        str(root / "task"),
        str(root / "ref_src"),
        targets,
        out,
        tasks=list(tasks),
        t_values=list(t_values),
        methods=kwargs.pop("methods", ("adamergex", "task_only")),
        include_path=str(root / "tasks"),
        batch_size=8,
        progress=False,
        **kwargs,
    )


def test_parse_target_references_and_tasks():
    assert parse_target_references("some/dir") == "some/dir"
    assert parse_target_references(["some/dir=x"]) == "some/dir=x"  # not a language code: a path
    assert parse_target_references(["sw=a", "zh-tw=b"]) == {"sw": "a", "zh-tw": "b"}
    assert parse_target_references(["sw=a"]) == {"sw": "a"}
    with pytest.raises(ValueError, match="LANG=PATH"):
        parse_target_references(["sw=a", "b"])
    with pytest.raises(ValueError, match="twice"):
        parse_target_references(["sw=a", "sw=b"])
    assert tasks_for_lang(["x_{lang}", "y"], "sw") == ["x_sw", "y"]
    with pytest.raises(ValueError, match="names no language"):
        tasks_for_lang(["x_{lang}"], None)
    keys = [p.key for p in plan_points(["adamergex", "task_only"], [0, 1], ["sw", "th"])]
    assert keys == [
        "sw:adamergex@0",
        "sw:adamergex@1",
        "sw:task_only",
        "th:adamergex@0",
        "th:adamergex@1",
        "th:task_only",
    ]


def test_several_languages_one_load(ml_setup, tmp_path, monkeypatch):
    import adamergex_peft.sweep.run as sweep_module  # run_sweep looks load_sweep_model up there

    root, out = ml_setup, tmp_path / "ml"
    targets = {"sw": str(root / "ref_sw"), "th": str(root / "ref_th")}
    loads = []
    real_load = sweep_module.load_sweep_model
    monkeypatch.setattr(sweep_module, "load_sweep_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    seen = []

    def interrupt_after_four(record):
        seen.append(record["key"])
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(root, out, targets, on_point=interrupt_after_four)
    assert len(loads) == 1  # one base model, every adapter, for the whole grid
    assert [p["key"] for p in json.loads((out / RESULTS_JSON).read_text())["points"]] == seen
    seen.clear()
    results = _run(root, out, targets, on_point=lambda r: seen.append(r["key"]))
    assert seen == ["th:adamergex@1", "th:task_only"]  # resumed per cell
    data = json.loads((out / RESULTS_JSON).read_text())
    assert [(p["lang"], p["key"]) for p in data["points"]] == [
        ("sw", "sw:adamergex@0"),
        ("sw", "sw:adamergex@1"),
        ("sw", "sw:task_only"),
        ("th", "th:adamergex@0"),
        ("th", "th:adamergex@1"),
        ("th", "th:task_only"),
    ]
    by_key = {p["key"]: p for p in data["points"]}
    assert set(by_key["sw:task_only"]["chosen"]) == {"adamergex_ml_sweeptest_sw"}
    assert set(by_key["th:task_only"]["chosen"]) == {"adamergex_ml_sweeptest_th"}

    # Each language's cells equal a one-language sweep with that language's reference and task.
    for lang, n_items in (("sw", 12), ("th", 16)):
        single = _run(root, tmp_path / f"single_{lang}", str(root / f"ref_{lang}"), [f"adamergex_ml_sweeptest_{lang}"])
        for point in single.points:
            multi = by_key[f"{lang}:{point['key']}"]
            assert multi["score"] == pytest.approx(point["score"])
            assert multi["label_free"]["tv"] == pytest.approx(point["label_free"]["tv"])
            assert multi["label_free"]["tasks"][f"adamergex_ml_sweeptest_{lang}"]["n"] == n_items
    # The target reference matters: th's task merged with sw's reference is another model at t=1.
    wrong = _run(root, tmp_path / "wrong", str(root / "ref_sw"), ["adamergex_ml_sweeptest_th"], t_values=[1.0])
    assert wrong.points[0]["label_free"]["entropy"] != pytest.approx(by_key["th:adamergex@1"]["label_free"]["entropy"])

    # Best per language, label-free best per language, and the best (method, t) by mean over languages.
    for lang in ("sw", "th"):
        pts = [p for p in data["points"] if p["lang"] == lang]
        assert data["best_per_lang"][lang]["key"] == max(pts, key=lambda p: p["score"])["key"]
        conf = max(pts, key=lambda p: p["label_free"]["calibrated_confidence"])
        assert data["best_label_free_per_lang"][lang]["key"] == conf["key"]
    means = {
        col: (by_key[f"sw:{col}"]["score"] + by_key[f"th:{col}"]["score"]) / 2
        for col in ("adamergex@0", "adamergex@1", "task_only")
    }
    assert data["best"]["key"] == max(means, key=means.get)
    assert data["best"]["score"] == pytest.approx(max(means.values()))
    assert results.best_label_free()["key"] == data["best_label_free"]["key"]

    # The tables: languages x (method, t).
    rows = list(csv.reader(io.StringIO((out / TABLE_CSV).read_text())))
    assert rows[0] == ["lang", "measure", "adamergex@0", "adamergex@1", "task_only"]
    score_rows = {r[0]: r[2:] for r in rows[1:] if r[1] == "score"}
    assert set(score_rows) == {"sw", "th"}
    for lang, values in score_rows.items():
        assert [float(v) for v in values] == [
            by_key[f"{lang}:{c}"]["score"] for c in ("adamergex@0", "adamergex@1", "task_only")
        ]
    assert {r[1] for r in rows[1:]} >= {"score", "calibrated_score", "tv", "entropy", "calibrated_confidence"}
    md = (out / TABLE_MD).read_text()
    assert "| lang | adamergex@0 | adamergex@1 | task_only |" in md and "| th |" in md and "### score" in md
    for name in (HEATMAP_PNG, PLOT_PNG):
        assert (out / name).read_bytes()[:8] == PNG
    with (out / RESULTS_CSV).open() as handle:
        assert [r["lang"] for r in csv.DictReader(handle)] == ["sw"] * 3 + ["th"] * 3


def test_one_language_keeps_todays_outputs(ml_setup, tmp_path):
    """A single PATH: no lang in the keys; the old files plus the table and the heat map."""
    root, out = ml_setup, tmp_path / "one"
    results = _run(
        root, out, str(root / "ref_sw"), ["adamergex_ml_sweeptest_sw"], t_values=[0.5], methods=["adamergex"]
    )
    data = json.loads((out / RESULTS_JSON).read_text())
    assert [p["key"] for p in data["points"]] == ["adamergex@0.5"] and "lang" not in data["points"][0]
    assert data["best"]["key"] == "adamergex@0.5" and "best_per_lang" not in data
    assert data["settings"]["target_reference"] == str(root / "ref_sw")
    for name in (RESULTS_CSV, TABLE_CSV, TABLE_MD):
        assert (out / name).is_file()
    for name in (PLOT_PNG, HEATMAP_PNG):
        assert (out / name).read_bytes()[:8] == PNG
    assert (out / TABLE_CSV).read_text().splitlines()[1].startswith("target,score,")
    assert results.langs() == [None]
    with pytest.raises(ValueError, match="names no language"):
        _run(root, tmp_path / "bad", str(root / "ref_sw"), ["adamergex_ml_sweeptest_{lang}"])
    assert not (tmp_path / "bad").exists()


def test_cli_several_languages(ml_setup, tmp_path, capsys):
    from adamergex_peft.cli import main

    root, out = ml_setup, tmp_path / "cli"
    argv = ["sweep", "--base-model", str(root / "base"), "--task-adapter", str(root / "task")]
    argv += ["--source-reference", str(root / "ref_src")]
    argv += ["--target-reference", f"sw={root / 'ref_sw'}", f"th={root / 'ref_th'}"]
    argv += ["--t", "1", "--methods", "adamergex", "task_only", "--tasks", "adamergex_ml_sweeptest_{lang}"]
    argv += ["--include-path", str(root / "tasks"), "--batch-size", "8", "--output", str(out), "--no-progress"]
    argv += ["--select", "label-free", "--label-free-rule", "least_prior_shift"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "best [sw]: " in printed and "best label-free [th] (least_prior_shift): " in printed
    assert "best (mean over languages): " in printed and "(selected)" in printed.split("best label-free (mean")[1]
    data = json.loads((out / RESULTS_JSON).read_text())
    assert data["select"] == "label-free" and data["label_free_rule"] == "least_prior_shift"
    assert data["selected"] == data["best_label_free"] and len(data["points"]) == 4
