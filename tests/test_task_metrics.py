"""acc_calibrated and auc of the log-likelihood tasks, reported by lm-eval itself (tiny model, offline).

lm-eval runs adamergex_xcopa_mc_sw and adamergex_xnli_mc_de on a tiny random Llama from local
JSONL (ADAMERGEX_DATA_DIR); the reported acc_calibrated and auc are recomputed here from the
per-document choice log-likelihoods that lm-eval logs (``log_samples``), with
adamergex_peft.calibration and an explicit pair count, and acc / acc_norm are checked against
lm-eval's own built-in multiple-choice scoring of the same log-likelihoods.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from adamergex_peft import calibration as cal

TASKS_DIR = Path(__file__).resolve().parents[1] / "lm_eval_tasks"
N_XCOPA = 10
N_XNLI = 9


def _utils():
    spec = importlib.util.spec_from_file_location("adamergex_task_utils_metrics", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(root: Path, task: str, lang: str, docs: list[dict]) -> None:
    path = root / task / lang / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("data")
    words = "stone river cloud bread lamp chair green quick sleep water".split()
    xcopa = [
        {
            "premise": f"The {words[i]} fell over.",
            "choice1": f"It was {words[(i + 3) % 10]}.",
            "choice2": f"The {words[(i + 5) % 10]} was wet.",
            "question": "cause" if i % 2 else "effect",
            "label": i % 2,
            "idx": i,
        }
        for i in range(N_XCOPA)
    ]
    xnli = [
        {"premise": f"A {words[i]} is here.", "hypothesis": f"The {words[(i + 4) % 10]} sleeps.", "label": i % 3}
        for i in range(N_XNLI)
    ]
    for lang in ("sw", "th", "tr", "vi", "zh"):  # the group adamergex_xcopa_mc runs them all
        _write(root, "xcopa", lang, xcopa)
    _write(root, "xnli", "de", xnli)
    mp = pytest.MonkeyPatch()
    mp.setenv("ADAMERGEX_DATA_DIR", str(root))

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(
        ["Premise: Hypothesis: Question: Answer: Relationship: " + " ".join(words)], trainer=trainer
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=256, device="cpu")
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["adamergex_xcopa_mc", "adamergex_xnli_mc_de"],
        task_manager=tm,
        log_samples=True,
        bootstrap_iters=0,
    )
    tasks = tm.load(["adamergex_xcopa_mc_sw", "adamergex_xnli_mc_de"])["tasks"]
    yield out, tasks, lm
    mp.undo()


def _logliks(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    samples = sorted(samples, key=lambda s: s["doc_id"])
    L = torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in samples], dtype=torch.float64)
    gold = torch.tensor([int(s["target"]) for s in samples])
    return L, gold


def _auc_by_pairs(margin: list[float], gold: list[int]) -> float:
    pos = [m for m, y in zip(margin, gold) if y == 1]
    neg = [m for m, y in zip(margin, gold) if y == 0]
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def test_xcopa_reports_acc_calibrated_and_auc(run):
    out = run[0]
    res = out["results"]["adamergex_xcopa_mc_sw"]
    L, gold = _logliks(out["samples"]["adamergex_xcopa_mc_sw"])
    assert L.shape == (N_XCOPA, 2)
    assert res["acc_calibrated,none"] == pytest.approx(cal.calibrated_accuracy(L, gold), abs=1e-12)
    # Uniform target with 10 documents: exactly 5 predictions per answer.
    assert torch.bincount(cal.calibrated_predictions(L), minlength=2).tolist() == [5, 5]
    margin = (L[:, 1] - L[:, 0]).tolist()
    assert res["auc,none"] == pytest.approx(_auc_by_pairs(margin, gold.tolist()), abs=1e-12)
    assert res["acc,none"] == pytest.approx(float((L.argmax(1) == gold).double().mean()))
    assert out["versions"]["adamergex_xcopa_mc_sw"] == 1.1


def test_xnli_reports_acc_calibrated_and_no_auc(run):
    out = run[0]
    res = out["results"]["adamergex_xnli_mc_de"]
    L, gold = _logliks(out["samples"]["adamergex_xnli_mc_de"])
    assert L.shape == (N_XNLI, 3)
    assert res["acc_calibrated,none"] == pytest.approx(cal.calibrated_accuracy(L, gold), abs=1e-12)
    assert torch.bincount(cal.calibrated_predictions(L), minlength=3).tolist() == [3, 3, 3]
    assert "auc,none" not in res
    assert res["acc,none"] == pytest.approx(float((L.argmax(1) == gold).double().mean()))


def test_group_averages_the_new_metrics(run):
    out = run[0]
    group = out["results"]["adamergex_xcopa_mc"]
    assert "acc_calibrated,none" in group and "auc,none" in group


def test_acc_and_acc_norm_equal_lm_eval_builtin_scoring(run):
    """Our process_results gives, per document, the values of lm-eval's own multiple-choice scoring."""
    out, tasks, _ = run
    for name, task in tasks.items():
        samples = {s["doc_id"]: s for s in out["samples"][name]}
        docs = list(task.test_docs())
        ours = task.config.process_results
        task.config.process_results = None  # lm-eval's built-in multiple_choice branch
        try:
            for doc_id, sample in samples.items():
                results = [tuple(r) for r in sample["filtered_resps"]]
                builtin = task.process_results(docs[doc_id], results)
                mine = ours(docs[doc_id], results)
                for metric in ("acc", "acc_norm"):
                    if metric in builtin:
                        assert mine[metric] == builtin[metric], (name, doc_id, metric)
                assert mine["acc"] == sample["acc"]
        finally:
            task.config.process_results = ours


def test_aggregations_return_nan_where_undefined():
    utils = _utils()
    assert math.isnan(utils.aggregate_auc([(1, [0.0, 1.0]), (1, [0.5, 0.2])]))  # one gold class only
    assert math.isnan(utils.aggregate_acc_calibrated([(0, [0.0, float("nan")])]))
    assert utils.aggregate_acc_calibrated([(0, [1.0, 0.0]), (1, [2.0, 1.5])]) == 1.0


def test_multiple_choice_results_ties_and_bad_gold():
    utils = _utils()
    tie = [(-1.0, False), (-1.0, False)]
    assert utils.multiple_choice_results(tie, 0)["acc"] == 1.0  # np.argmax: first of equal values
    out = utils.multiple_choice_results(tie, 5, metrics=("acc", "acc_calibrated"))
    assert out == {"acc": 0.0, "acc_calibrated": (-100, [-1.0, -1.0])}
    # acc_norm divides by the length of each choice in characters
    assert utils.multiple_choice_results([(-4.0, False), (-6.0, False)], 1, ["ab", "abcdef"], ("acc_norm",)) == {
        "acc_norm": 1.0
    }
    with pytest.raises(ValueError, match="unknown multiple-choice metric"):
        utils.multiple_choice_results(tie, 0, metrics=("f1",))


def _readme_blocks() -> tuple[str, str]:
    """The python and yaml snippets of lm_eval_tasks/README.md's "your own multiple-choice task" recipe."""
    text = (TASKS_DIR / "README.md").read_text(encoding="utf-8")
    recipe = text[text.index("**Adding them to your own multiple-choice task**") :]
    python = recipe.split("```python\n", 1)[1].split("```", 1)[0]
    yaml_part = recipe.split("```yaml\n", 1)[1].split("```", 1)[0]
    return python, yaml_part


def test_readme_recipe_for_your_own_task(run, tmp_path):
    """The README's few lines, pasted into a user's task folder, report acc_calibrated and auc."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    python, yaml_part = _readme_blocks()
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "utils.py").write_text(python, encoding="utf-8")
    data = tmp_path / "my_test.jsonl"
    docs = [{"prompt": f"Item {i} is", "choices": ["red", "blue"], "label": i % 2} for i in range(8)]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    header = "\n".join(
        [
            "task: my_binary_task",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data))}",
            "test_split: test",
            "output_type: multiple_choice",
            "doc_to_text: prompt",
            "doc_to_choice: choices",
            "doc_to_target: label",
            "target_delimiter: ' '",
            "",
        ]
    )
    (folder / "my_binary_task.yaml").write_text(header + yaml_part, encoding="utf-8")
    lm = run[2]
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=["my_binary_task"],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    got = res["results"]["my_binary_task"]
    L, gold = _logliks(res["samples"]["my_binary_task"])
    assert got["acc_calibrated,none"] == pytest.approx(cal.calibrated_accuracy(L, gold), abs=1e-12)
    assert got["auc,none"] == pytest.approx(_auc_by_pairs((L[:, 1] - L[:, 0]).tolist(), gold.tolist()), abs=1e-12)
    assert got["acc,none"] == pytest.approx(float((L.argmax(1) == gold).double().mean()))


def test_source_checkout_without_the_package_on_sys_path(monkeypatch):
    """utils.py finds ../adamergex_peft/calibration.py by file when adamergex_peft cannot be imported."""
    import sys

    monkeypatch.setitem(sys.modules, "adamergex_peft", None)  # import adamergex_peft -> ImportError
    utils = _utils()
    assert utils.aggregate_acc_calibrated([(0, [1.0, 0.0]), (1, [2.0, 1.5])]) == 1.0
    assert Path(utils._calibration().__file__) == TASKS_DIR.parent / "adamergex_peft" / "calibration.py"
