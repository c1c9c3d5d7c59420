"""Write the per-language task YAML and the group YAML of the AdaMergeX lm-eval tasks.

Run from anywhere after changing a language list or a prompt, and commit the result:

    python lm_eval_tasks/_generate_configs.py

Shared settings live in the hand-written ``_<task>_template_yaml`` files beside this script;
each generated file ``include:``s one of them and adds what differs per language (task name,
hub config, data-loading arguments and, where the prompt names the language, the prompt).
Functions (data loader, metrics) are referenced only from the templates, so that
``!function utils.<name>`` always resolves to the ``utils.py`` beside this script.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
SEED = 112

LANGUAGE_NAMES = {
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

# The paper's 12 target languages that each dataset has (SPEC section 3).
TASK_LANGUAGES = {
    "mgsm": ["de", "es", "fr", "ru", "sw", "th", "zh"],
    "xcopa": ["sw", "th", "tr", "vi", "zh"],
    "xnli": ["ar", "de", "el", "es", "fr", "hi", "ru", "sw", "th", "tr", "vi", "zh"],
    "xquad": ["ar", "de", "el", "es", "hi", "ru", "th", "tr", "vi", "zh"],
    "xlsum": ["ar", "es", "fr", "hi", "ru", "sw", "th", "tr", "vi", "zh"],
}

XLSUM_CONFIGS = {
    "ar": "arabic",
    "es": "spanish",
    "fr": "french",
    "hi": "hindi",
    "ru": "russian",
    "sw": "swahili",
    "th": "thai",
    "tr": "turkish",
    "vi": "vietnamese",
    "zh": "chinese_simplified",
}

# Hub dataset, config per language, split evaluated on, sample size (None: all documents).
DATASETS: dict[str, dict[str, Any]] = {
    "mgsm": {"path": "juletxara/mgsm", "config": "{lang}", "split": "test", "sample": None},
    "xcopa": {"path": "cambridgeltl/xcopa", "config": "{lang}", "split": "test", "sample": None},
    "xnli": {"path": "facebook/xnli", "config": "{lang}", "split": "test", "sample": 1000},
    "xquad": {"path": "google/xquad", "config": "xquad.{lang}", "split": "validation", "sample": 1000},
    "xlsum": {"path": "csebuetnlp/xlsum", "config": None, "split": "test", "sample": 500},
}

GROUP_METRICS = {
    "mgsm": ["acc"],
    "xcopa": ["acc"],
    "xcopa_mc": ["acc", "acc_norm", "acc_calibrated", "auc"],
    "xnli": ["acc"],
    "xnli_mc": ["acc", "acc_calibrated"],
    "xquad": ["exact_match", "f1"],
    "xlsum": ["rougeL"],
}

# Prompt of the merged-model XLSum task (the only merged prompt that names the language).
XLSUM_PROMPT = (
    "Title: {{{{title}}}}\nContext: {{{{text}}}}\n"
    "You should summarize the text above in one sentence in {lang}.\nSummary: "
)

# XLT (Huang et al., 2023) prompts of the paper's bare-model baseline, from the official
# evaluation scripts, with their typos fixed: "expert for{Lang}" -> "expert for {Lang}.",
# "act as act as" -> "act as", "false(contradiction)" -> "false (contradiction)",
# "two sentences ." -> "two sentences.", XQuAD's context and question no longer run together.
_XLT_HEAD = (
    "I want you to act as {role} expert for {lang}.\n"
    "You should retell the question in English.\n"
    "You should answer the question in English in one or a few words.\n"
    "You should step-by-step answer the request."
)
XLT_PROMPTS = {
    "mgsm": _XLT_HEAD.replace("{role}", "an arithmetic reasoning") + "\n\nQuestion: {{{{question}}}}\nAnswer: ",
    "xcopa": _XLT_HEAD.replace("{role}", "a commonsense reasoning")
    + " Here is a premise and a question. Help me pick the more plausible option. Answer with (A) or (B).\n"
    "Premise: {{{{premise}}}}\nQuestion: What is the {{{{question}}}}?\n(A) {{{{choice1}}}}\n(B) {{{{choice2}}}}\n"
    "Answer: ",
    "xnli": "I want you to act as a natural language inference expert for {lang}.\n"
    "Premise: {{{{premise}}}}\nHypothesis: {{{{hypothesis}}}}\n"
    "You should retell the premise and hypothesis in English.\n"
    "You should judge whether the hypothesis is true (entailment), false (contradiction), or undetermined "
    "(neutral) given the premise. The relationship can be chosen from entailment, contradiction, and neutral.\n"
    "You should step-by-step answer the request. Answer by entailment, contradiction or neutral.\n"
    "Relationship: ",
    "xquad": _XLT_HEAD.replace("{role}", "a question answering")
    + "\nContext: {{{{context}}}}\nQuestion: {{{{question}}}}\nAnswer: ",
    "xlsum": "I want you to act as a multilingual summarization expert for {lang}.\n"
    "Title: {{{{title}}}}\nContext: {{{{text}}}}\n"
    "You should repeat the entire text in English. You should think step-by-step to summarize the entire "
    "text in a maximum of two sentences. You should step-by-step answer the request. You should tell me the "
    "summary into one sentence in {lang}.\nSummary: ",
}

# XLT answers follow an English retelling, so they are not cut at the first newline.
XLT_GENERATION = {
    "mgsm": {"until": ["Question:"], "max_gen_toks": 512},
    "xcopa": {"until": ["\n\n"], "max_gen_toks": 16},
    "xnli": {"until": ["\n\n"], "max_gen_toks": 16},
    "xquad": {"until": ["\n\n"], "max_gen_toks": 32},
    "xlsum": {"until": ["\n\n"], "max_gen_toks": 64},
}

HEADER = "# Generated by _generate_configs.py: edit that script (or the included template), not this file.\n"


def dataset_kwargs(task: str, lang: str) -> dict[str, Any]:
    """Arguments of utils.load_adamergex_dataset for one task and language."""
    spec = DATASETS[task]
    config = XLSUM_CONFIGS[lang] if task == "xlsum" else spec["config"].format(lang=lang)
    return {
        "adamergex_task": task,
        "adamergex_lang": lang,
        "hf_path": spec["path"],
        "hf_name": config,
        "eval_split": spec["split"],
        "sample_size": spec["sample"],
        "sample_seed": SEED,
    }


def task_config(task: str, lang: str, variant: str) -> dict[str, Any]:
    """One per-language task config; variant is "merged", "mc" or "xlt"."""
    template = {"mc": f"_{task}_mc_template_yaml"}.get(variant, f"_{task}_template_yaml")
    name = {
        "merged": f"adamergex_{task}_{lang}",
        "mc": f"adamergex_{task}_mc_{lang}",
        "xlt": f"adamergex_xlt_{task}_{lang}",
    }[variant]
    kwargs = dataset_kwargs(task, lang)
    cfg: dict[str, Any] = {
        "include": f"../{template}",
        "task": name,
        "dataset_name": kwargs["hf_name"],
        "dataset_kwargs": kwargs,
    }
    if variant == "merged" and task == "xlsum":
        cfg["doc_to_text"] = XLSUM_PROMPT.format(lang=LANGUAGE_NAMES[lang])
    if variant == "xlt":
        cfg["doc_to_text"] = XLT_PROMPTS[task].format(lang=LANGUAGE_NAMES[lang])
        cfg["generation_kwargs"] = {
            "until": XLT_GENERATION[task]["until"],
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": XLT_GENERATION[task]["max_gen_toks"],
        }
    return cfg


# Group versions that differ from 1.0 (see the README's changelog).
GROUP_VERSIONS = {"adamergex_xcopa_mc": 1.1, "adamergex_xnli_mc": 1.1}


def group_config(group: str, tasks: list[str], metrics: list[str] | None) -> dict[str, Any]:
    """A group over tasks; metrics are averaged over languages with equal weight (the paper's "Avg")."""
    cfg: dict[str, Any] = {"group": group, "task": tasks}
    if metrics:
        cfg["aggregate_metric_list"] = [{"metric": m, "aggregation": "mean", "weight_by_size": False} for m in metrics]
    cfg["metadata"] = {"version": GROUP_VERSIONS.get(group, 1.0)}
    return cfg


class _Dumper(yaml.SafeDumper):
    """Writes strings holding newlines as one double-quoted line with \\n escapes (readable prompts)."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _dump(path: Path, cfg: dict[str, Any]) -> None:
    text = yaml.dump(cfg, Dumper=_Dumper, allow_unicode=True, sort_keys=False, width=10_000, default_flow_style=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(HEADER + text, encoding="utf-8")
    tmp.replace(path)


def generate(out_dir: Path = HERE) -> list[Path]:
    """Write every per-language and group YAML under out_dir; returns the written paths."""
    written: list[Path] = []

    def write(rel: str, cfg: dict[str, Any]) -> None:
        path = out_dir / rel
        _dump(path, cfg)
        written.append(path)

    for folder in [*TASK_LANGUAGES, "xlt"]:
        if (out_dir / folder).is_dir():
            shutil.rmtree(out_dir / folder)  # no stale language files survive a regeneration

    families = []
    xlt_groups = []
    for task, langs in TASK_LANGUAGES.items():
        variants = ["merged", "mc"] if task in ("xcopa", "xnli") else ["merged"]
        for variant in variants:
            suffix = "_mc" if variant == "mc" else ""
            names = []
            for lang in langs:
                cfg = task_config(task, lang, variant)
                write(f"{task}/{cfg['task']}.yaml", cfg)
                names.append(cfg["task"])
            group = f"adamergex_{task}{suffix}"
            write(f"{task}/_{group}.yaml", group_config(group, names, GROUP_METRICS[f"{task}{suffix}"]))
            if variant == "merged":
                families.append(group)
        names = []
        for lang in langs:
            cfg = task_config(task, lang, "xlt")
            write(f"xlt/{cfg['task']}.yaml", cfg)
            names.append(cfg["task"])
        group = f"adamergex_xlt_{task}"
        write(f"xlt/_{group}.yaml", group_config(group, names, GROUP_METRICS[task]))
        xlt_groups.append(group)

    # Umbrella groups: no aggregate, their members report different metrics.
    write("xlt/_adamergex_xlt.yaml", group_config("adamergex_xlt", xlt_groups, None))
    write("_adamergex.yaml", group_config("adamergex", families, None))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out_dir", type=Path, default=HERE, help="Folder to write into (default: beside this script)."
    )
    args = parser.parse_args()
    written = generate(args.out_dir)
    print(f"wrote {len(written)} files under {args.out_dir}")


if __name__ == "__main__":
    main()
