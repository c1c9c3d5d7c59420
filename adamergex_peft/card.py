"""Model cards (``README.md`` with Hub metadata) for merged adapters and exported full models.

Built with ``huggingface_hub``'s model-card support (:class:`~huggingface_hub.ModelCardData` for
the YAML header, :class:`~huggingface_hub.ModelCard` for the file; no jinja2 needed, so
``adamergex merge`` writes cards with the package's own dependencies), from what the
output folder already holds: ``adapter_config.json`` (adapter) or ``config.json`` (full model) and
the provenance record ``adamergex_config.json`` (settings, inputs with their sha256, library
versions, merge report; for a full model also its ``export`` section). Optionally, the evaluation
table of a sweep (``sweep_results.json``, see :mod:`adamergex_peft.sweep`).

Metadata: ``base_model`` (the adapters' ``base_model_name_or_path``, when it is a Hub id),
``library_name`` (``peft`` for an adapter, ``transformers`` for a full model), ``tags``
(``adamergex``, ``lora``/``ia3``, ``cross-lingual-transfer``...), ``language`` (source and target).
Uploading stays ``hf upload <repo> <folder>``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from adamergex_peft.atomic import atomic_write_text
from adamergex_peft.config import ADAPTER_CONFIG_NAME, CONFIG_NAME
from adamergex_peft.errors import AdaMergeXError

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
MODEL_CONFIG_NAME = "config.json"

CITATION = """@inproceedings{zhao2025adamergex,
  title     = {AdaMergeX: Cross-Lingual Transfer with Large Language Models via Adaptive Adapter Merging},
  author    = {Zhao, Yiran and Zhang, Wenxuan and Wang, Huiming and Kawaguchi, Kenji and Bing, Lidong},
  booktitle = {Proceedings of NAACL},
  year      = {2025}
}"""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_ROLE_TITLES = {
    "task_adapter": "task adapter (T, source language)",
    "source_reference_adapter": "source reference adapter (Rs)",
    "target_reference_adapter": "target reference adapter (Rg)",
}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdaMergeXError(f"cannot read {what} {str(path)!r}: {err}") from None
    if not isinstance(data, dict):
        raise AdaMergeXError(f"{what} {str(path)!r} is not a JSON object.")
    return data


def _hub_id(name: str | None) -> str | None:
    """``name`` if it looks like a Hub id (``org/model``) and is not a local path, else ``None``."""
    if not name or not _HUB_ID.match(name) or os.path.exists(name):
        return None
    return name


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def sweep_table(sweep: dict[str, Any], lang: str | None = None) -> str:
    """Markdown table(s) of a sweep: one row per point (method, t, score, each task's chosen metric).

    A sweep over several target languages (points carrying ``lang``) gives one table per language
    (their tasks differ: ``xcopa_sw``, ``xcopa_th``...), each with its own best point; ``lang``
    keeps that language's table only (when the sweep has it).
    """
    points = sweep.get("points") or []
    if not points:
        return "_The sweep has no evaluated points._"
    langs = list(dict.fromkeys(p.get("lang") for p in points))
    if lang is not None and lang in langs:
        langs = [lang]
    if langs == [None]:
        tables = [_points_table(points)]
    else:
        tables = []
        for one in langs:
            title = f"Target language `{one}`:" if one is not None else "Other points:"
            tables.append(f"{title}\n\n" + _points_table([p for p in points if p.get("lang") == one]))
    settings = sweep.get("settings") or {}
    details = ", ".join(
        f"{k}: {settings[k]}" for k in ("tasks", "num_fewshot", "limit") if settings.get(k) is not None
    )
    return "\n\n".join(tables) + (f"\n\nSweep settings: {details}." if details else "")


def _points_table(points: list[dict[str, Any]]) -> str:
    tasks = sorted({task for p in points for task in p.get("chosen", {})})
    metrics = {
        task: next(p["chosen"][task]["metric"] for p in points if task in p.get("chosen", {})) for task in tasks
    }
    scored = [p for p in points if isinstance(p.get("score"), (int, float)) and p["score"] == p["score"]]
    best = max(scored, key=lambda p: p["score"]) if scored else None
    header = ["method", "t", "score", *(f"{task} ({metrics[task]})" for task in tasks)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in points:
        mark = " **(best)**" if p is best else ""
        cells = [f"{p['method']}{mark}", _fmt(p.get("t")), _fmt(p.get("score"))]
        cells += [_fmt(p.get("chosen", {}).get(task, {}).get("value")) for task in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_model_card(
    folder: str | os.PathLike,
    *,
    base_model: str | None = None,
    target_language: str | None = None,
    source_language: str | None = None,
    sweep_results: str | os.PathLike | dict | None = None,
    repo_id: str | None = None,
    license: str | None = None,
):
    """A :class:`huggingface_hub.ModelCard` for an output folder (adapter or full model).

    Args:
        folder: a merged adapter folder (``adapter_config.json``) or an exported model folder
            (``config.json``), with its ``adamergex_config.json`` if it has one.
        base_model: Hub id of the base model; default: the adapters' ``base_model_name_or_path``
            (left out of the metadata when it is a local path).
        target_language, source_language: language codes (``sw``, ``en``...) for ``language``.
        sweep_results: ``sweep_results.json`` (path or its dict) whose points become a table.
        repo_id: how the load snippets name this model (default: the folder's path).
        license: ``license`` metadata, e.g. the base model's.

    Raises:
        AdaMergeXError: not an adapter or model folder; unreadable JSON.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    record = _read_json(folder / CONFIG_NAME, "provenance record") if (folder / CONFIG_NAME).is_file() else {}
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        kind = "adapter"
        adapter_config = _read_json(folder / ADAPTER_CONFIG_NAME, "adapter config")
        peft_type = str(adapter_config.get("peft_type", "")).upper()
        recorded_base = adapter_config.get("base_model_name_or_path")
    elif (folder / MODEL_CONFIG_NAME).is_file():
        kind = "model"
        adapter_config = None
        export = record.get("export", {})
        peft_type = str(export.get("peft_type") or record.get("report", {}).get("peft_type", "")).upper()
        recorded_base = export.get("adapter_base_model") or export.get("base_model")
    else:
        raise AdaMergeXError(
            f"{str(folder)!r} has neither {ADAPTER_CONFIG_NAME} nor {MODEL_CONFIG_NAME}: not an adapter or model folder."
        )
    if isinstance(sweep_results, (str, os.PathLike)):
        sweep_results = _read_json(Path(sweep_results), "sweep results")

    base_name = base_model or recorded_base
    adapter_tag = {"LORA": "lora", "IA3": "ia3"}.get(peft_type)
    tags = ["adamergex", *([adapter_tag] if adapter_tag else []), "cross-lingual-transfer"]
    tags += ["peft"] if kind == "adapter" else ["merged-adapter"]
    languages = [lang for lang in (source_language, target_language) if lang]
    card_data = ModelCardData(
        base_model=_hub_id(base_name),
        library_name="peft" if kind == "adapter" else "transformers",
        tags=tags,
        language=list(dict.fromkeys(languages)) or None,
        license=license,
        pipeline_tag="text-generation",
    )
    body = _body(
        folder,
        kind,
        peft_type,
        record,
        adapter_config,
        base_name,
        target_language,
        source_language,
        repo_id,
        sweep_results,
    )
    # What ModelCard.from_template renders with a "---\n{{ card_data }}\n---\n\n{{ body }}" template,
    # without its jinja2 requirement (huggingface_hub depends on pyyaml, not on jinja2).
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


def write_model_card(folder: str | os.PathLike, **kwargs: Any) -> Path:
    """Build the card (see :func:`build_model_card`) and write it to ``folder/README.md`` atomically."""
    card = build_model_card(folder, **kwargs)
    path = Path(folder) / CARD_NAME
    atomic_write_text(path, str(card))
    logger.info("wrote model card %s", path)
    return path


def _body(folder, kind, peft_type, record, adapter_config, base_name, target, source, repo_id, sweep) -> str:
    config = record.get("config", {})
    adapter_word = {"LORA": "LoRA", "IA3": "(IA)^3"}.get(peft_type, peft_type or "PEFT")
    where = f" for {target}" if target else ""
    base_text = f"`{base_name}`" if base_name else "its base model"
    repo = repo_id or str(folder)
    lines: list[str] = []
    if kind == "adapter":
        lines.append(f"# {adapter_word} adapter{where}, merged with AdaMergeX")
        lines.append("")
        lines.append(
            f"A {adapter_word} adapter for {base_text}, built without training by AdaMergeX cross-lingual "
            "adapter merging: a task adapter trained in the source language"
            + (f" ({source})" if source else "")
            + " plus the language gap between two reference adapters (target minus source language"
            + (f", {target}" if target else "")
            + ")."
        )
    else:
        lines.append(f"# {base_text.strip('`')} with an AdaMergeX {adapter_word} update merged in{where}")
        lines.append("")
        lines.append(
            f"A full transformers model: {base_text} with an AdaMergeX {adapter_word} adapter merged into its "
            "weights (no adapter needed at inference). The adapter was built without training by AdaMergeX "
            "cross-lingual adapter merging: a source-language task adapter plus the language gap between two "
            "reference adapters."
        )
    lines += ["", "## How it was built", ""]
    if config:
        t = config.get("t")
        settings = [f"method `{config.get('method')}`", f"t = {t}"]
        if peft_type == "LORA":
            settings.append(f"LoRA strategy `{config.get('lora_strategy')}`")
            if config.get("svd_rank") is not None:
                settings.append(f"svd rank {config['svd_rank']}")
            if config.get("pad_rank") is not None:
                settings.append(f"zero-padded to rank {report_rank(record)} (pad_rank {config['pad_rank']!r})")
        elif peft_type == "IA3":
            settings.append(f"(IA)^3 strategy `{config.get('ia3_strategy')}`")
        lines.append("Settings: " + ", ".join(settings) + ".")
        lines.append("")
    inputs = record.get("inputs") or {}
    if inputs:
        lines += ["| input | path | sha256 of the weights |", "|---|---|---|"]
        for role in sorted(
            inputs, key=lambda r: list(_ROLE_TITLES).index(r) if r in _ROLE_TITLES else len(_ROLE_TITLES)
        ):
            info = inputs[role]
            lines.append(f"| {_ROLE_TITLES.get(role, role)} | `{info.get('path')}` | `{info.get('weights_sha256')}` |")
        lines.append("")
    report = record.get("report") or {}
    if report.get("rank") is not None:
        lines.append(f"Merged rank: {report['rank']} over {report.get('modules')} modules.")
    if report.get("svd_kept_energy_min") is not None:
        lines.append(f"SVD truncation keeps at least {report['svd_kept_energy_min']:.4f} of each update's energy.")
    export = record.get("export") or {}
    if export:
        lines.append(
            f"Exported into the base weights ({export.get('modules')} modules, dtype {export.get('dtype')}) from "
            f"`{export.get('base_model')}`."
        )
    versions = {**(record.get("versions") or {})}
    if export.get("adamergex_peft") and "adamergex_peft" not in versions:
        versions["adamergex_peft"] = export["adamergex_peft"]
    if versions:
        lines.append("Library versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".")
    if not record:
        lines.append(f"(No {CONFIG_NAME} provenance record was found in the folder.)")
    lines.append(f"The full record is in `{CONFIG_NAME}`." if record else "")
    lines += ["", "## How to use", ""]
    lines += _usage(kind, peft_type, adapter_config, base_name or "BASE_MODEL", repo)
    if sweep:
        lines += [
            "",
            "## Evaluation",
            "",
            "Scores of the merge at several methods and `t` (an `adamergex sweep`):",
            "",
        ]
        lines.append(sweep_table(sweep, lang=target))
    lines += [
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
        "Made with adamergex-peft (AdaMergeX for Hugging Face PEFT). Upload with `hf upload REPO_ID FOLDER`.",
    ]
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def report_rank(record: dict[str, Any]) -> Any:
    """The merged adapter's rank from the record's report (``?`` if absent)."""
    return (record.get("report") or {}).get("rank", "?")


def _usage(kind: str, peft_type: str, adapter_config: dict | None, base: str, repo: str) -> list[str]:
    if kind == "model":
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            "```",
            "",
            "Evaluate with lm-evaluation-harness, or serve it with vLLM like any model:",
            "",
            "```bash",
            f"lm_eval --model hf --model_args pretrained={repo} --tasks TASKS",
            f"vllm serve {repo}",
            "```",
        ]
    lines = [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{repo}")',
        "```",
        "",
        "Evaluate with lm-evaluation-harness:",
        "",
        "```bash",
        f"lm_eval --model hf --model_args pretrained={base},peft={repo} --tasks TASKS",
        "```",
        "",
    ]
    if peft_type != "LORA":
        lines.append(
            "vLLM, TGI and LoRAX serve LoRA adapters only; to serve this (IA)^3 adapter, export a full model with "
            "the update merged in (`adamergex merge ... --base-model BASE --into-base`, or "
            "`adamergex_peft.export.export_merged_model`)."
        )
        return lines
    from adamergex_peft.serving import vllm_max_lora_rank, vllm_problems

    problems = vllm_problems(adapter_config or {})
    if problems:
        lines.append(
            "This adapter does not load in vLLM as is: " + "; ".join(problems) + ". Merge with `--pad-rank vllm` "
            "(one rank, no patterns) or export a full model (`--into-base`)."
        )
        return lines
    rank = vllm_max_lora_rank(adapter_config)
    lines += [
        f"Serve it with vLLM (rank {adapter_config.get('r')}, so `--max-lora-rank {rank}`):",
        "",
        "```bash",
        f"vllm serve {base} --enable-lora --lora-modules adamergex={repo} --max-lora-rank {rank}",
        f"lm_eval --model vllm --model_args pretrained={base},lora_local_path={repo},max_lora_rank={rank} --tasks TASKS",
        "```",
    ]
    return lines
