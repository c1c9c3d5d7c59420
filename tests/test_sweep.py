"""The t sweep: lm-eval scoring, JSON/CSV/PNG outputs, resume, base weights restored, CLI."""

from __future__ import annotations

import csv
import json

import pytest

from adamergex_peft import testing
from adamergex_peft.sweep import (
    PLOT_PNG,
    RESULTS_CSV,
    RESULTS_JSON,
    SweepPoint,
    SweepResults,
    plan_points,
    run_sweep,
    summarize_lm_eval,
)


def test_plan_points():
    points = plan_points(["adamergex", "task_only", "cross", "adamergex"], [0, 0.5, 0.5, 1])
    assert [p.key for p in points] == [
        "adamergex@0",
        "adamergex@0.5",
        "adamergex@1",
        "task_only",
        "cross@0",
        "cross@0.5",
        "cross@1",
    ]
    assert plan_points(["task_only"], []) == [SweepPoint("task_only", None)]
    with pytest.raises(ValueError):
        plan_points(["adamergex"], [])


def test_summarize_lm_eval_picks_metrics():
    results = {
        "results": {
            "a": {"alias": "a", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.7},
            "b": {"alias": "b", "exact_match,strict": 0.25},
            "grp_x": {"acc,none": 0.2},
            "grp_y": {"acc,none": 0.4},
        }
    }
    out = summarize_lm_eval(results, ["a", "b"])
    assert out["chosen"] == {"a": {"metric": "acc", "value": 0.5}, "b": {"metric": "exact_match", "value": 0.25}}
    assert out["score"] == pytest.approx(0.375)
    assert summarize_lm_eval(results, ["a"], metric="acc_norm")["score"] == 0.7
    assert summarize_lm_eval(results, ["grp"])["score"] == pytest.approx(0.3)  # mean of its sub-tasks
    with pytest.raises(ValueError):
        summarize_lm_eval(results, ["missing"])


@pytest.fixture(scope="module")
def sweep_setup(tmp_path_factory):
    """A tiny base model, three random LoRA adapters, and a local multiple-choice lm-eval task."""
    root = tmp_path_factory.mktemp("sweep")
    testing.topic_sweep_models(root, ("task", "ref_src", "ref_tgt"), seed=100)
    rows = testing.topic_rows(("apple", "book"))
    testing.write_jsonl(rows, root / "test.jsonl")
    testing.write_task_yaml(
        root / "tasks",
        "adamergex_demo_sweeptest",
        root / "test.jsonl",
        doc_to_text="prompt",
        doc_to_choice="choices",
        doc_to_target="label",
        target_delimiter=" ",
    )
    return root


def _run(root, out, t_values, methods=("adamergex", "task_only"), on_point=None):
    return run_sweep(
        str(root / "base"),
        str(root / "task"),
        str(root / "ref_src"),
        str(root / "ref_tgt"),
        out,
        tasks=["adamergex_demo_sweeptest"],
        t_values=t_values,
        methods=methods,
        include_path=str(root / "tasks"),
        batch_size=4,
        progress=False,
        on_point=on_point,
    )


def test_sweep_writes_outputs_and_resumes(sweep_setup, tmp_path):
    root, out = sweep_setup, tmp_path / "sweep"
    seen: list[str] = []

    def interrupt_after_two(record):
        seen.append(record["key"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(root, out, [0.0, 1.0], on_point=interrupt_after_two)
    partial = json.loads((out / RESULTS_JSON).read_text())
    assert [p["key"] for p in partial["points"]] == ["adamergex@0", "adamergex@1"]

    seen.clear()
    results = _run(root, out, [0.0, 1.0], on_point=lambda r: seen.append(r["key"]))
    assert seen == ["task_only"]  # only the point not yet done
    assert [p["key"] for p in results.points] == ["adamergex@0", "adamergex@1", "task_only"]
    for point in results.points:
        assert 0.0 <= point["score"] <= 1.0 and point["chosen"]["adamergex_demo_sweeptest"]["metric"] == "acc"
    # t = 0 is the task adapter alone: the same model as task_only, so the same score.
    by_key = {p["key"]: p["score"] for p in results.points}
    assert by_key["adamergex@0"] == pytest.approx(by_key["task_only"])

    data = json.loads((out / RESULTS_JSON).read_text())
    assert data["best"]["score"] == max(by_key.values())
    with (out / RESULTS_CSV).open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["t"]) for r in rows] == [("adamergex", "0.0"), ("adamergex", "1.0"), ("task_only", "")]
    assert (out / PLOT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # More t values later: only the new ones run. All done: nothing runs (model not even loaded).
    seen.clear()
    _run(root, out, [0.0, 0.5, 1.0], on_point=lambda r: seen.append(r["key"]))
    assert seen == ["adamergex@0.5"]
    seen.clear()
    _run(root, out, [0.5], on_point=lambda r: seen.append(r["key"]))
    assert seen == []
    # Other settings in the same folder: refused, nothing overwritten.
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(
            str(root / "base"),
            str(root / "ref_src"),
            str(root / "ref_src"),
            str(root / "ref_tgt"),
            out,
            tasks=["adamergex_demo_sweeptest"],
            include_path=str(root / "tasks"),
            progress=False,
        )


def test_evaluate_points_restores_the_base_weights(sweep_setup, tmp_path):
    import torch

    from adamergex_peft.sweep import evaluate_points, load_sweep_model

    root = sweep_setup
    model, _tok = load_sweep_model(
        str(root / "base"), str(root / "task"), str(root / "ref_src"), str(root / "ref_tgt")
    )
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    scores = []

    def fake_evaluate(base):
        # The merged update is in the base weights while evaluating, adapters disabled.
        changed = any(not torch.equal(before[k], v) for k, v in base.state_dict().items())
        scores.append(changed)
        return {"score": float(changed), "chosen": {}, "tasks": {}}

    evaluate_points(
        model, plan_points(["adamergex"], [1.0]), fake_evaluate, SweepResults(settings={}), tmp_path, progress=False
    )
    assert scores == [True]
    after = model.get_base_model().state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


def test_sweep_cli(sweep_setup, tmp_path, capsys):
    from adamergex_peft.cli import main

    root, out = sweep_setup, tmp_path / "cli"
    argv = ["sweep", "--base-model", str(root / "base"), "--task-adapter", str(root / "task")]
    argv += ["--source-reference", str(root / "ref_src"), "--target-reference", str(root / "ref_tgt")]
    argv += ["--t", "0", "1", "--methods", "adamergex", "arimerge", "--tasks", "adamergex_demo_sweeptest"]
    argv += ["--include-path", str(root / "tasks"), "--batch-size", "4", "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "best: " in printed and RESULTS_JSON in printed
    data = json.loads((out / RESULTS_JSON).read_text())
    assert len(data["points"]) == 3
    # Both picks printed; the labelled one is selected by default, the label-free one names its rule.
    lines = printed.splitlines()
    best_line = next(line for line in lines if line.startswith("best: "))
    picked_line = next(line for line in lines if line.startswith("best label-free"))
    assert best_line.endswith("(selected)") and not picked_line.endswith("(selected)")
    assert picked_line.startswith(f"best label-free (calibrated_confidence): {data['best_label_free']['method']}")
    assert data["select"] == "labelled" and data["selected"] == data["best"]
