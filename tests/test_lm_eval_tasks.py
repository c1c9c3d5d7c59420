"""Tests of the AdaMergeX lm-eval tasks in lm_eval_tasks/ (offline: local JSONL data, tiny model).

Every task is built by lm-eval's own TaskManager from tiny JSONL files in the hub schemas (read
through ADAMERGEX_DATA_DIR); the metric functions are checked on hand-made generations; the
paper's sampling is checked against the official scripts' ``random.seed(112); random.sample``;
and the tasks run end to end through the ``lm_eval`` CLI and through ``simple_evaluate`` with a
tiny Llama built here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

TASKS_DIR = Path(__file__).resolve().parents[1] / "lm_eval_tasks"

# SPEC section 3, written out independently of _generate_configs.py.
LANGS = {
    "mgsm": "de es fr ru sw th zh".split(),
    "xcopa": "sw th tr vi zh".split(),
    "xnli": "ar de el es fr hi ru sw th tr vi zh".split(),
    "xquad": "ar de el es hi ru th tr vi zh".split(),
    "xlsum": "ar es fr hi ru sw th tr vi zh".split(),
}
LANG_NAMES = {
    "ar": "Arabic",
    "de": "German",
    "el": "Greek",
    "es": "Spanish",
    "fr": "French",
    "hi": "Hindi",
    "ru": "Russian",
    "sw": "Swahili",
    "th": "Thai",
    "tr": "Turkish",
    "vi": "Vietnamese",
    "zh": "Chinese",
}
SPLIT = {"mgsm": "test", "xcopa": "test", "xnli": "test", "xquad": "validation", "xlsum": "test"}
SAMPLE = {"mgsm": None, "xcopa": None, "xnli": 1000, "xquad": 1000, "xlsum": 500}
HUB = {
    "mgsm": ("juletxara/mgsm", "{lang}"),
    "xcopa": ("cambridgeltl/xcopa", "{lang}"),
    "xnli": ("facebook/xnli", "{lang}"),
    "xquad": ("google/xquad", "xquad.{lang}"),
    "xlsum": ("csebuetnlp/xlsum", None),
}
XLSUM_CONFIG = {"zh": "chinese_simplified", "ar": "arabic", "sw": "swahili", "th": "thai"}

MERGED = {f"adamergex_{task}_{lang}": (task, lang) for task, langs in LANGS.items() for lang in langs}
XLT = {f"adamergex_xlt_{task}_{lang}": (task, lang) for task, langs in LANGS.items() for lang in langs}
MC = {f"adamergex_{task}_mc_{lang}": (task, lang) for task in ("xcopa", "xnli") for lang in LANGS[task]}
ALL_TASKS = {**MERGED, **XLT, **MC}


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


utils = _load_module("adamergex_task_utils", TASKS_DIR / "utils.py")


def make_doc(task: str, lang: str, i: int) -> dict[str, Any]:
    """Document i of a task in the hub dataset's schema (fields as in lm-eval's own task YAML)."""
    tag = f"{lang}{i}"
    if task == "mgsm":
        return {
            "question": f"Q{tag}: Anna has 12 apples and eats 5. How many are left?",
            "answer": None,
            "answer_number": 7 + i,
            "equation_solution": None,
        }
    if task == "xcopa":
        return {
            "premise": f"P{tag} the man broke his toe.",
            "choice1": f"He dropped a hammer {tag}.",
            "choice2": f"He got a hole in his sock {tag}.",
            "question": "cause" if i % 2 == 0 else "effect",
            "label": i % 2,
            "idx": i,
        }
    if task == "xnli":
        return {"premise": f"P{tag} a man plays.", "hypothesis": f"H{tag} a man sleeps.", "label": i % 3}
    if task == "xquad":
        return {
            "id": f"id-{tag}",
            "context": f"C{tag} Paris is the capital of France.",
            "question": f"Q{tag} what is the capital of France?",
            "answers": {"text": [f"Paris {tag}"], "answer_start": [len(f"C{tag} ")]},
        }
    return {
        "id": f"id-{tag}",
        "url": f"https://example.org/{tag}",
        "title": f"T{tag} title",
        "summary": f"S{tag} summary",
        "text": f"X{tag} article text",
    }


def write_jsonl(data_dir: Path, task: str, lang: str, docs: list[dict[str, Any]]) -> Path:
    path = data_dir / task / lang / f"{SPLIT[task]}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Three documents per task and language, in the layout ADAMERGEX_DATA_DIR expects."""
    root = tmp_path_factory.mktemp("adamergex_data")
    for task, langs in LANGS.items():
        for lang in langs:
            write_jsonl(root, task, lang, [make_doc(task, lang, i) for i in range(3)])
    return root


@pytest.fixture(scope="module")
def offline_env(data_dir):
    old = os.environ.get(utils.DATA_DIR_ENV)
    os.environ[utils.DATA_DIR_ENV] = str(data_dir)
    yield data_dir
    if old is None:
        os.environ.pop(utils.DATA_DIR_ENV, None)
    else:
        os.environ[utils.DATA_DIR_ENV] = old


@pytest.fixture(scope="module")
def task_manager(offline_env):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


@pytest.fixture(scope="module")
def loaded(task_manager) -> dict[str, Any]:
    """Every group (and through them every task), built by lm-eval."""
    groups = ["adamergex", "adamergex_xlt", "adamergex_xcopa_mc", "adamergex_xnli_mc"]
    return task_manager.load(groups)


def _docs(task) -> list[dict[str, Any]]:
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


# ------------------------------------------------------------------------- task configs


def test_index_holds_exactly_the_expected_tasks(task_manager):
    indexed = {name for name in task_manager.all_subtasks if name.startswith("adamergex")}
    assert indexed == set(ALL_TASKS)


def test_every_task_builds_and_renders_prompt_and_target(loaded):
    tasks = loaded["tasks"]
    assert set(tasks) == set(ALL_TASKS)
    for name, (family, lang) in ALL_TASKS.items():
        task = tasks[name]
        docs = _docs(task)
        assert len(docs) == 3, name
        doc = docs[0]
        assert doc == make_doc(family, lang, 0), name  # the local file, fields unchanged
        prompt = task.doc_to_text(doc)
        assert isinstance(prompt, str) and prompt.strip(), name
        assert task.config.metadata["version"] >= 1.0, name
        # The document's own text is in the prompt.
        key = {"mgsm": "question", "xcopa": "premise", "xnli": "premise", "xquad": "context", "xlsum": "text"}[family]
        assert doc[key] in prompt, name
        target = task.doc_to_target(doc)
        if name in MC:
            assert task.OUTPUT_TYPE == "multiple_choice", name
            choices = task.doc_to_choice(doc)
            assert target == doc["label"] and len(choices) == (2 if family == "xcopa" else 3), name
            continue
        assert task.OUTPUT_TYPE == "generate_until", name
        expected_target = {
            "mgsm": lambda d: str(d["answer_number"]),
            "xcopa": lambda d: "(A)",
            "xnli": lambda d: "entailment",
            "xquad": lambda d: d["answers"]["text"][0],
            "xlsum": lambda d: d["summary"],
        }[family](doc)
        assert target == expected_target, name
        gen = task.config.generation_kwargs
        assert gen["do_sample"] is False and gen["temperature"] == 0.0, name
        assert gen["until"] and gen["max_gen_toks"] > 0, name
        if name in XLT:
            assert prompt.startswith("I want you to act as "), name
            assert f"expert for {LANG_NAMES[lang]}.\n" in prompt, name
            assert "act as act as" not in prompt and "false(" not in prompt, name
        else:
            assert "I want you to act as" not in prompt, name


def test_merged_prompts(loaded):
    tasks = loaded["tasks"]
    mgsm = tasks["adamergex_mgsm_sw"]
    doc = _docs(mgsm)[0]
    assert mgsm.doc_to_text(doc) == f"Let's think step by step.\n\nQuestion: {doc['question']}\nAnswer: "
    xcopa = tasks["adamergex_xcopa_th"]
    doc = _docs(xcopa)[1]  # an "effect" question
    assert xcopa.doc_to_text(doc).endswith(
        f"Premise: {doc['premise']}\nQuestion: What is the effect?\n(A) {doc['choice1']}\n(B) {doc['choice2']}\nAnswer: "
    )
    assert xcopa.doc_to_target(doc) == "(B)"
    xlsum = tasks["adamergex_xlsum_zh"]
    assert "in Chinese." in xlsum.doc_to_text(_docs(xlsum)[0])


def test_xlt_prompt_matches_spec(loaded):
    task = loaded["tasks"]["adamergex_xlt_xcopa_sw"]
    doc = _docs(task)[0]
    assert task.doc_to_text(doc) == (
        "I want you to act as a commonsense reasoning expert for Swahili.\nYou should retell the question in "
        "English.\nYou should answer the question in English in one or a few words.\nYou should step-by-step "
        "answer the request. Here is a premise and a question. Help me pick the more plausible option. Answer "
        f"with (A) or (B).\nPremise: {doc['premise']}\nQuestion: What is the cause?\n(A) {doc['choice1']}\n"
        f"(B) {doc['choice2']}\nAnswer: "
    )
    xnli = loaded["tasks"]["adamergex_xlt_xnli_hi"]
    assert xnli.doc_to_text(_docs(xnli)[0]).endswith("Answer by entailment, contradiction or neutral.\nRelationship: ")


def test_dataset_kwargs_name_the_hub_dataset(loaded):
    for name, (family, lang) in ALL_TASKS.items():
        kwargs = loaded["tasks"][name].config.dataset_kwargs
        path, config = HUB[family]
        config = XLSUM_CONFIG.get(lang) if family == "xlsum" else config.format(lang=lang)
        assert kwargs["hf_path"] == path, name
        if config is not None:
            assert kwargs["hf_name"] == config, name
        assert kwargs["eval_split"] == SPLIT[family], name
        assert kwargs["sample_size"] == SAMPLE[family] and kwargs["sample_seed"] == 112, name


def test_group_membership_is_complete(loaded):
    group_map = {name: set(children) for name, children in loaded["group_map"].items()}
    families = set(LANGS)
    assert group_map["adamergex"] == {f"adamergex_{f}" for f in families}
    assert group_map["adamergex_xlt"] == {f"adamergex_xlt_{f}" for f in families}
    for family, langs in LANGS.items():
        assert group_map[f"adamergex_{family}"] == {f"adamergex_{family}_{lang}" for lang in langs}
        assert group_map[f"adamergex_xlt_{family}"] == {f"adamergex_xlt_{family}_{lang}" for lang in langs}
    for family in ("xcopa", "xnli"):
        assert group_map[f"adamergex_{family}_mc"] == {f"adamergex_{family}_mc_{lang}" for lang in LANGS[family]}


def test_committed_configs_match_the_generator(tmp_path):
    generator = _load_module("adamergex_generate_configs", TASKS_DIR / "_generate_configs.py")
    written = generator.generate(tmp_path)
    committed = {p.relative_to(TASKS_DIR) for p in TASKS_DIR.rglob("*.yaml")}
    assert {p.relative_to(tmp_path) for p in written} == committed
    for rel in committed:
        assert (tmp_path / rel).read_text(encoding="utf-8") == (TASKS_DIR / rel).read_text(encoding="utf-8"), rel


# ------------------------------------------------------------------------- data loading and sampling


def _official_sample(docs: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """What the official scripts did: seed the global RNG, then random.sample (state restored after)."""
    state = random.getstate()
    try:
        random.seed(112)
        return random.sample(docs, k)
    finally:
        random.setstate(state)


@pytest.mark.parametrize(
    ("family", "lang", "n_docs"), [("xnli", "sw", 1203), ("xquad", "th", 1190), ("xlsum", "zh", 640)]
)
def test_sampling_gives_paper_size_and_official_documents(tmp_path, monkeypatch, family, lang, n_docs):
    docs = [make_doc(family, lang, i) for i in range(n_docs)]
    write_jsonl(tmp_path, family, lang, docs)
    monkeypatch.setenv(utils.DATA_DIR_ENV, str(tmp_path))
    path, config = HUB[family]
    kwargs = {
        "adamergex_task": family,
        "adamergex_lang": lang,
        "hf_path": path,
        "hf_name": config,
        "eval_split": SPLIT[family],
        "sample_size": SAMPLE[family],
        "sample_seed": 112,
    }
    first = utils.load_adamergex_dataset(**kwargs, version=1.0)[SPLIT[family]]
    second = utils.load_adamergex_dataset(**kwargs)[SPLIT[family]]
    assert len(first) == SAMPLE[family]
    assert list(first) == list(second)  # deterministic
    assert list(first) == _official_sample(docs, SAMPLE[family])
    state = random.getstate()  # the loader's sampling leaves the global RNG alone
    utils.sample_indices(n_docs, SAMPLE[family])
    assert random.getstate() == state


def test_no_sampling_when_split_is_small_or_size_is_none():
    assert utils.sample_indices(250, None) is None
    assert utils.sample_indices(500, None) is None
    assert utils.sample_indices(900, 1000) is None
    assert utils.sample_indices(1000, 1000) is None
    assert sorted(utils.sample_indices(1001, 1000)) != list(range(1000))
    assert len(set(utils.sample_indices(5010, 1000))) == 1000


def test_task_sees_paper_sample_size(tmp_path, monkeypatch):
    """Through lm-eval: an XNLI split with more than 1000 documents yields the 1000 sampled ones."""
    from lm_eval.tasks import TaskManager

    docs = [make_doc("xnli", "de", i) for i in range(1100)]
    write_jsonl(tmp_path, "xnli", "de", docs)
    monkeypatch.setenv(utils.DATA_DIR_ENV, str(tmp_path))
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    tasks = tm.load(["adamergex_xnli_de", "adamergex_xnli_mc_de", "adamergex_xlt_xnli_de"])["tasks"]
    expected = _official_sample(docs, 1000)
    for task in tasks.values():
        assert list(task.test_docs()) == expected


def test_local_data_does_not_depend_on_current_directory(offline_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = utils.load_adamergex_dataset(
        adamergex_task="xcopa",
        adamergex_lang="sw",
        hf_path="cambridgeltl/xcopa",
        hf_name="sw",
        eval_split="test",
    )
    assert list(ds) == ["test"] and ds["test"][0] == make_doc("xcopa", "sw", 0)
    assert utils.local_data_path("rel", "xquad", "de", "validation") == (tmp_path / "rel/xquad/de/validation.jsonl")


def test_missing_local_file_names_the_expected_path(tmp_path, monkeypatch):
    monkeypatch.setenv(utils.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"xquad/de/validation\.jsonl"):
        utils.load_adamergex_dataset(
            adamergex_task="xquad",
            adamergex_lang="de",
            hf_path="google/xquad",
            hf_name="xquad.de",
            eval_split="validation",
            sample_size=1000,
        )


def test_hub_mode_loads_the_hub_dataset_then_samples(monkeypatch):
    """Without ADAMERGEX_DATA_DIR the loader asks datasets for the hub dataset (here intercepted)."""
    import datasets

    monkeypatch.delenv(utils.DATA_DIR_ENV, raising=False)
    docs = [make_doc("xlsum", "zh", i) for i in range(520)]
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        if "revision" not in kwargs:
            raise RuntimeError("Dataset scripts are no longer supported, but found xlsum.py")
        return datasets.Dataset.from_list(docs)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = utils.load_adamergex_dataset(
        adamergex_task="xlsum",
        adamergex_lang="zh",
        hf_path="csebuetnlp/xlsum",
        hf_name="chinese_simplified",
        eval_split="test",
        sample_size=500,
    )
    assert calls[0] == ("csebuetnlp/xlsum", "chinese_simplified", "test", {})
    assert calls[1][3] == {"revision": "refs/convert/parquet"}
    assert list(ds["test"]) == _official_sample(docs, 500)


# ------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("Anna eats 5 of 12 apples, 12 - 5 = 7. The answer is 7.", 7.0),
        ("12 - 5 = 7\n#### 7", 7.0),
        ("She sold 1,250 cups at $2 each, so she made $2,500.", 2500.0),
        ("The answer is 3.5 liters, since 7 / 2 = 3.5", 3.5),
        ("-4 degrees", -4.0),
        ("答案是 ٣", 3.0),
        ("I do not know.", None),
        ("", None),
    ],
)
def test_extract_number(generation, expected):
    assert utils.extract_number(generation) == expected


def test_mgsm_scores_the_generation_not_the_prompt():
    doc = make_doc("mgsm", "de", 0)  # the question holds the numbers 12 and 5; the answer is 7
    assert utils.process_results_mgsm(doc, ["12 - 5 = 7. The answer is 7."]) == {"acc": 1.0}
    assert utils.process_results_mgsm(doc, ["Let me think about it."]) == {"acc": 0.0}
    assert utils.process_results_mgsm(doc, ["12 + 5 = 17"]) == {"acc": 0.0}
    doc["answer_number"] = 5  # a number that appears in the prompt, never in the generation
    assert utils.process_results_mgsm(doc, ["no idea"]) == {"acc": 0.0}


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("(B)", 1),
        (" (A) He dropped a hammer.", 0),
        ("B", 1),
        ("A.", 0),
        ("The answer is B", 1),
        ("He got a hole in his sock.", 1),
        ("A man dropped a hammer on his foot", None),  # "A" as an article is not an answer
        ("I am not sure", None),
    ],
)
def test_extract_choice(generation, expected):
    assert utils.extract_choice(generation, "He dropped a hammer.", "He got a hole in his sock.") == expected


def test_xcopa_unreadable_answer_is_wrong_not_a():
    doc = make_doc("xcopa", "sw", 0)  # label 0 = (A)
    assert utils.process_results_xcopa(doc, ["(A)"]) == {"acc": 1.0}
    assert utils.process_results_xcopa(doc, ["hmm"]) == {"acc": 0.0}


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("entailment", 0),
        (" Neutral.", 1),
        ("Contradiction", 2),
        ("The hypothesis contradicts the premise, so not entailment", 2),
        ("entailment, contradiction or neutral", 0),
        ("yes", None),
    ],
)
def test_extract_nli_label(generation, expected):
    assert utils.extract_nli_label(generation) == expected


def test_xnli_listing_every_label_is_not_always_right():
    doc = make_doc("xnli", "de", 2)  # label 2 = contradiction
    assert utils.process_results_xnli(doc, ["contradiction"]) == {"acc": 1.0}
    assert utils.process_results_xnli(doc, ["entailment, contradiction or neutral"]) == {"acc": 0.0}


def test_xquad_exact_match_and_f1():
    doc = {"answers": {"text": ["the Eiffel Tower", "Eiffel Tower in Paris"], "answer_start": [0, 4]}}
    # Normalisation: case, punctuation, articles, whitespace.
    assert utils.process_results_xquad(doc, ["Eiffel tower.\nmore text"]) == {"exact_match": 1.0, "f1": 1.0}
    # The official script's "['...']" answer format is read too.
    assert utils.process_results_xquad(doc, ["['Eiffel Tower']"])["exact_match"] == 1.0
    # Partial overlap: prediction "tower in london" vs "eiffel tower in paris": 2 common tokens.
    result = utils.process_results_xquad(doc, ["Tower in London"])
    precision, recall = 2 / 3, 2 / 4
    assert result["exact_match"] == 0.0
    assert result["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert utils.process_results_xquad(doc, [""]) == {"exact_match": 0.0, "f1": 0.0}


def test_xquad_scores_chinese_and_thai_by_character():
    assert utils.squad_f1("巴黎市", ["巴黎"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert utils.squad_exact_match("巴黎。", ["巴黎"]) == 1.0
    # Thai: characters with their combining marks (ี attaches to ด).
    assert utils.multilingual_tokenize("ดี") == ["ดี"]
    # Devanagari vowel signs stay inside the word.
    assert utils.multilingual_tokenize("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]
    assert utils.multilingual_tokenize("Hello, 世界!") == ["hello", "世", "界"]


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _rouge_l_by_hand(pred: list[str], ref: list[str]) -> float:
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def test_xlsum_rouge_l_on_known_pairs():
    # English words: LCS("the cat sat on the mat", "the cat lay on the red mat") = 5 ("the cat on the mat").
    ref, pred = "The cat lay on the red mat.", "the cat sat on the mat"
    assert utils.rouge_l_f1(pred, ref) == pytest.approx(2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7))
    assert utils.process_results_xlsum({"summary": ref}, [f"  {pred}\n"])["rougeL"] == pytest.approx(
        _rouge_l_by_hand(pred.split(), ["the", "cat", "lay", "on", "the", "red", "mat"])
    )
    # Chinese by character: LCS("我喜欢猫", "我很喜欢狗") = 3 ("我喜欢"); not divided by the reference length.
    assert utils.rouge_l_f1("我喜欢猫", "我很喜欢狗") == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    # Russian (rouge_score's default tokenizer would find no tokens and score 0).
    ru_pred, ru_ref = "Кошка сидит на ковре", "Кошка спит на ковре"
    assert utils.rouge_l_f1(ru_pred, ru_ref) == pytest.approx(0.75)
    assert utils.rouge_l_f1("", ru_ref) == 0.0


# ------------------------------------------------------------------------- end to end


@pytest.fixture
def lm_eval_here(lm_eval_cli, data_dir, monkeypatch):
    """``lm_eval ...`` in this process with the local data (the console script: test_lm_eval_plugin.py)."""
    monkeypatch.setenv(utils.DATA_DIR_ENV, str(data_dir))  # offline variables: from conftest.py
    return lm_eval_cli


def test_lm_eval_validate_accepts_every_task_and_group(lm_eval_here, tmp_path):
    names = [*ALL_TASKS, "adamergex", "adamergex_xlt", "adamergex_xcopa_mc", "adamergex_xnli_mc"]
    names += [f"adamergex_{f}" for f in LANGS] + [f"adamergex_xlt_{f}" for f in LANGS]
    code, out, err = lm_eval_here("validate", "--tasks", ",".join(names), "--include_path", TASKS_DIR, cwd=tmp_path)
    assert code == 0, out + err
    assert "All tasks found and valid" in out
    code, out, err = lm_eval_here(
        "validate", "--tasks", "adamergex_xcopa_de", "--include_path", TASKS_DIR, cwd=tmp_path
    )
    assert code != 0  # XCOPA has no German: no such task


def test_lm_eval_cli_runs_tasks_from_include_path(lm_eval_here, tmp_path):
    """`lm_eval --tasks adamergex_xcopa_sw --include_path <repo>/lm_eval_tasks` from another directory."""
    out = tmp_path / "results"
    code, stdout, stderr = lm_eval_here(
        "--model",
        "dummy",
        # lm-eval hands model_args to every task's custom_dataset as metadata: must not break loading.
        "--model_args",
        "pretrained=unused,t=1,dtype=float32",
        "--tasks",
        "adamergex_xcopa_sw,adamergex_xnli_mc_de",
        "--include_path",
        TASKS_DIR,
        "--limit",
        "2",
        "--output_path",
        out,
        cwd=tmp_path,
    )
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    # The dummy model answers "lol" to every prompt: no option can be read, so XCOPA accuracy is 0.
    assert results["adamergex_xcopa_sw"]["acc,none"] == 0.0
    assert 0.0 <= results["adamergex_xnli_mc_de"]["acc,none"] <= 1.0


def _tiny_hflm():
    from lm_eval.models.huggingface import HFLM

    from adamergex_peft import testing

    text = ["Premise: Question: Answer: Context: the man broke his toe"]
    tokenizer = testing.bpe_tokenizer(text, vocab_size=300, unk_token=None, pad_token="<pad>")
    model = testing.tiny_llama(tokenizer=tokenizer, max_positions=512)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=512, device="cpu")


def test_simple_evaluate_with_tiny_model(task_manager):
    """One generation task and one log-likelihood task, run by lm-eval on a tiny random Llama."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=_tiny_hflm(),
        tasks=["adamergex_xquad_de", "adamergex_xcopa_mc_sw"],
        task_manager=task_manager,
        limit=2,
        log_samples=True,
    )
    xquad = results["results"]["adamergex_xquad_de"]
    assert 0.0 <= xquad["exact_match,none"] <= xquad["f1,none"] <= 1.0
    assert 0.0 <= results["results"]["adamergex_xcopa_mc_sw"]["acc,none"] <= 1.0
    samples = results["samples"]["adamergex_xquad_de"]
    assert len(samples) == 2
    assert all(s["arguments"][0][1]["do_sample"] is False for s in samples)
