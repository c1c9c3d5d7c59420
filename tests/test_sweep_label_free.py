"""The sweep's label-free statistics, calibrated metrics and label-free choice of t (issue 10.3).

The stored values are checked against :mod:`adamergex_peft.calibration` applied to per-item
choice log-likelihoods obtained independently (lm-eval's own ``simple_evaluate`` with logged
samples, on the task adapter merged by PEFT's ``merge_and_unload``), and the label-free pick is
checked to be invariant to the labels (the same documents with every label flipped).
"""

from __future__ import annotations

import json

import pytest

from adamergex_peft import calibration as cal
from adamergex_peft import testing
from adamergex_peft.sweep import (
    LABEL_FREE_RULES,
    RESULTS_JSON,
    TABLE_MD,
    SweepResults,
    run_sweep,
    summarize_samples,
)

TASK = "adamergex_lf_sweeptest"
FLIPPED = "adamergex_lf_sweeptest_flipped"


@pytest.fixture(scope="module")
def lf_setup(tmp_path_factory):
    """A tiny base model, three random LoRA adapters, a 16-item two-choice task and its label-flipped twin."""
    root = tmp_path_factory.mktemp("sweep_lf")
    testing.topic_sweep_models(root, ("task", "ref_src", "ref_tgt"), seed=200)
    rows = testing.topic_rows(("apple", "book", "food", "study"))
    testing.write_jsonl(rows, root / "test.jsonl")
    testing.write_jsonl([{**r, "label": 1 - r["label"]} for r in rows], root / "flipped.jsonl")
    for name, data in ((TASK, "test.jsonl"), (FLIPPED, "flipped.jsonl")):
        testing.write_task_yaml(
            root / "tasks",
            name,
            root / data,
            doc_to_text="prompt",
            doc_to_choice="choices",
            doc_to_target="label",
            target_delimiter=" ",
        )
    return root


def _sweep(root, out, task, **kwargs):
    return run_sweep(
        str(root / "base"),
        str(root / "task"),
        str(root / "ref_src"),
        str(root / "ref_tgt"),
        out,
        tasks=[task],
        t_values=kwargs.pop("t_values", [0.0, 1.0, 3.0]),
        methods=kwargs.pop("methods", ("adamergex", "task_only")),
        include_path=str(root / "tasks"),
        batch_size=8,
        progress=False,
        **kwargs,
    )


def _task_only_logliks(root, task):
    """Per-item choice log-likelihoods and golds of the task adapter alone, through lm-eval's own route."""
    import torch
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(root / "base")
    model = PeftModel.from_pretrained(base, root / "task").merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    out = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
        tasks=[task],
        task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    loglik = torch.tensor([[r[0] for r in s["filtered_resps"]] for s in samples], dtype=torch.float64)
    return loglik, [int(s["target"]) for s in samples], out["results"][task]["acc,none"]


def test_summarize_samples_against_calibration():
    """Synthetic logged samples (3 choices, shuffled doc ids, a second filter): the closed forms of calibration.py."""
    import torch

    gen = torch.Generator().manual_seed(0)
    L = torch.randn(11, 3, generator=gen, dtype=torch.float64) + torch.tensor([0.0, 0.8, -0.3], dtype=torch.float64)
    golds = [int(g) for g in torch.randint(0, 3, (11,), generator=gen)]
    samples = [
        {"doc_id": i, "target": golds[i], "filter": "none", "filtered_resps": [(float(v), False) for v in L[i]]}
        for i in range(11)
    ][::-1]
    samples += [{"doc_id": 0, "target": 0, "filter": "other", "filtered_resps": [(0.0, False)] * 3}]
    reference = [0.5, 0.3, 0.2]
    out = summarize_samples({"t3": samples}, reference=reference, reference_name="src")
    stats = out["label_free"]["tasks"]["t3"]
    assert stats["n"] == 11 and stats["k"] == 3
    assert stats["distribution"] == pytest.approx(cal.predicted_distribution(L).tolist())
    expected_tv = 0.5 * sum(abs(p - r) for p, r in zip(cal.predicted_distribution(L).tolist(), reference))
    assert stats["tv"] == pytest.approx(expected_tv)
    probs = torch.softmax(L, dim=1)
    assert stats["entropy"] == pytest.approx(float(-(probs * probs.log()).sum(dim=1).mean()))
    calibrated = torch.softmax(L + cal.prior_offsets(L, reference), dim=1)
    assert stats["calibrated_confidence"] == pytest.approx(float(calibrated.max(dim=1).values.mean()))
    assert out["label_free"]["reference"] == "src" and out["label_free"]["tv"] == pytest.approx(expected_tv)
    assert out["calibrated"]["t3"] == {"acc_calibrated": pytest.approx(cal.calibrated_accuracy(L, golds, reference))}
    assert out["calibrated_score"] == pytest.approx(cal.calibrated_accuracy(L, golds, reference))
    # Not log-likelihoods (a generation task's strings): left out.
    gen_samples = [{"doc_id": 0, "target": "x", "filter": "none", "filtered_resps": ["some text"]}]
    assert summarize_samples({"g": gen_samples})["label_free"] is None


def test_sweep_label_free_values_and_selection(lf_setup, tmp_path):
    root, out = lf_setup, tmp_path / "lf"
    results = _sweep(root, out, TASK, select="label-free")
    data = json.loads((out / RESULTS_JSON).read_text())
    assert "samples" not in json.dumps(data)  # the logged samples are reduced, not stored
    by_key = {p["key"]: p for p in data["points"]}
    assert set(by_key) == {"adamergex@0", "adamergex@1", "adamergex@3", "task_only"}

    L, golds, acc = _task_only_logliks(root, TASK)
    point = by_key["task_only"]
    assert point["score"] == pytest.approx(acc)
    stats = point["label_free"]["tasks"][TASK]
    assert stats["distribution"] == pytest.approx(cal.predicted_distribution(L).tolist())
    assert stats["tv"] == pytest.approx(cal.total_variation(cal.predicted_distribution(L), [0.5, 0.5]))
    assert stats["entropy"] == pytest.approx(cal.mean_choice_entropy(L), rel=1e-5)
    assert stats["calibrated_confidence"] == pytest.approx(cal.calibrated_confidence([L])[1][0], rel=1e-5)
    assert point["label_free"]["reference"] == "uniform"
    assert point["calibrated"][TASK]["acc_calibrated"] == pytest.approx(cal.calibrated_accuracy(L, golds))
    assert point["calibrated"][TASK]["auc"] == pytest.approx(cal.binary_auc(L[:, 1] - L[:, 0], golds))
    assert point["calibrated_score"] == point["calibrated"][TASK]["acc_calibrated"]
    # t = 0 is the task adapter alone: the same statistics.
    at_zero = by_key["adamergex@0"]["label_free"]["tasks"][TASK]
    assert at_zero["distribution"] == stats["distribution"]
    assert {k: at_zero[k] for k in ("tv", "entropy")} == pytest.approx({k: stats[k] for k in ("tv", "entropy")})

    # The label-free pick: the documented rule over the stored statistics (highest calibrated confidence).
    confidences = {k: p["label_free"]["calibrated_confidence"] for k, p in by_key.items()}
    assert len(set(confidences.values())) > 1  # the merges differ, so the rule has something to choose
    top = max(confidences.values())
    expected = next(k for k, v in confidences.items() if v >= top - 1e-6)  # near-ties (round-off): the first
    assert data["best_label_free"]["key"] == expected and data["label_free_rule"] == "calibrated_confidence"
    assert data["selected"]["key"] == expected and data["select"] == "label-free"
    assert data["best"]["key"] == max(by_key, key=lambda k: by_key[k]["score"])
    tvs = {k: p["label_free"]["tv"] for k, p in by_key.items()}
    lps = SweepResults.load(out / RESULTS_JSON).best_label_free(rule="least_prior_shift")
    assert lps["key"] == next(k for k, v in tvs.items() if v <= min(tvs.values()) + 1e-6)
    assert results.best_label_free()["key"] == expected
    assert "†" in (out / TABLE_MD).read_text() and set(LABEL_FREE_RULES) == {
        "calibrated_confidence",
        "least_prior_shift",
    }


def test_label_free_pick_ignores_the_labels(lf_setup, tmp_path):
    """Every label flipped: the labelled scores change, the label-free statistics and picks do not."""
    root = lf_setup
    plain = _sweep(root, tmp_path / "plain", TASK).to_dict()
    flipped = _sweep(root, tmp_path / "flipped", FLIPPED).to_dict()
    scores = [(p["score"], q["score"]) for p, q in zip(plain["points"], flipped["points"])]
    assert all(a == pytest.approx(1 - b) for a, b in scores)  # two choices: flipped labels, complementary acc
    assert any(abs(a - b) > 1e-9 for a, b in scores)

    def stats(point, task):
        return point["label_free"]["tasks"][task]

    for p, q in zip(plain["points"], flipped["points"]):
        assert p["key"] == q["key"] and stats(p, TASK) == stats(q, FLIPPED)
    assert plain["best_label_free"]["key"] == flipped["best_label_free"]["key"]
    for rule in LABEL_FREE_RULES:
        pick = SweepResults(settings={}, points=plain["points"]).best_label_free(rule=rule)
        pick_flipped = SweepResults(settings={}, points=flipped["points"]).best_label_free(rule=rule)
        assert pick["key"] == pick_flipped["key"]


def test_reference_task_is_the_task_adapters_shares(lf_setup, tmp_path):
    """``reference_task``: the task adapter's predicted shares on it, evaluated once and stored."""
    root, out = lf_setup, tmp_path / "ref"
    results = _sweep(root, out, TASK, t_values=[1.0], reference_task=TASK)
    data = json.loads((out / RESULTS_JSON).read_text())
    by_key = {p["key"]: p for p in data["points"]}
    task_only = by_key["task_only"]["label_free"]
    assert data["reference"]["task"] == TASK and data["reference"]["n"] == 16
    assert data["reference"]["distribution"] == pytest.approx(task_only["tasks"][TASK]["distribution"])
    assert task_only["tv"] == pytest.approx(0.0) and task_only["reference"] == TASK
    merged = by_key["adamergex@1"]["label_free"]["tasks"][TASK]
    assert merged["tv"] == pytest.approx(
        cal.total_variation(merged["distribution"], data["reference"]["distribution"])
    )
    assert data["settings"]["reference_task"] == TASK and results.reference == data["reference"]
    # Resumed with the same settings: nothing re-evaluated, the reference kept.
    seen = []
    again = _sweep(root, out, TASK, t_values=[1.0], reference_task=TASK, on_point=seen.append)
    assert seen == [] and again.reference == data["reference"]


def test_mutual_info_requests_and_no_label_free(lf_setup, tmp_path):
    """Extra unconditional requests (acc_mutual_info) are cut to the choices; label_free=False stores nothing."""
    import torch

    L = torch.tensor([[0.0, 1.0], [2.0, 0.5], [0.3, 0.2]], dtype=torch.float64)
    samples = [
        {
            "doc_id": i,
            "doc": {"c": ["x", "y"]},
            "target": "y",
            "filter": "none",
            "filtered_resps": [(float(v), False) for v in [*L[i], -9.0, 9.0]],
        }
        for i in range(3)
    ]

    class Task:
        def get_config(self, key):
            return "multiple_choice"

        def doc_to_choice(self, doc):
            return doc["c"]

    out = summarize_samples({"mi": samples}, {"mi": Task()})
    assert out["label_free"]["tasks"]["mi"]["distribution"] == pytest.approx(cal.predicted_distribution(L).tolist())
    assert out["calibrated"]["mi"]["acc_calibrated"] == pytest.approx(cal.calibrated_accuracy(L, [1, 1, 1]))

    results = _sweep(lf_setup, tmp_path / "off", TASK, t_values=[1.0], methods=["adamergex"], label_free=False)
    data = json.loads((tmp_path / "off" / RESULTS_JSON).read_text())
    assert "label_free" not in data["points"][0] and data["best_label_free"] is None
    assert data["best"]["key"] == "adamergex@1" and results.best_label_free() is None
