"""Shared pieces of the label-free experiments: scoring choices, the merge-evaluate-undo loop, resumable JSON.

The per-item log-likelihood of a choice is what lm-eval's ``loglikelihood`` computes for a
multiple-choice task: ``sum_j log p(choice token j | prompt, earlier choice tokens)`` (no length
normalisation), here in float32 on the CPU.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def choice_logliks(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    add_bos: bool = True,
) -> list[list[float]]:
    """(n, k) log-likelihoods of each continuation ``choices[i][j]`` after ``prompts[i]``.

    Prompt and continuation are tokenised separately (lm-eval's habit for a continuation that starts
    with a space). Sequences are right-padded; only the continuation positions go through the
    output layer, which keeps a 262k-word vocabulary affordable on the CPU.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # rows: (ids, [(item, choice, first_position, target_ids)]); an item whose continuations are all
    # one token needs one row (the prompt), read at its last position.
    rows = []
    for i, (p, cs) in enumerate(zip(prompts, choices)):
        p_ids = bos + tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in cs]
        if all(len(c) == 1 for c in c_ids):
            rows.append((p_ids, [(i, j, len(p_ids) - 1, c) for j, c in enumerate(c_ids)]))
        else:
            rows += [(p_ids + c, [(i, j, len(p_ids) - 1, c)]) for j, c in enumerate(c_ids)]
    rows.sort(key=lambda r: len(r[0]))
    out = [[0.0] * len(cs) for cs in choices]
    softcap = getattr(base.config, "final_logit_softcapping", None)
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(r[0]) for r in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (row, _reads) in enumerate(batch):
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
            for r, (_row, reads) in enumerate(batch):
                first = reads[0][2]
                span = max(len(c) for *_x, c in reads)
                logits = base.lm_head(hidden[r, first : first + span]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                logp = torch.log_softmax(logits, dim=-1)
                for i, j, _first, c in reads:
                    out[i][j] = float(sum(logp[q, tok] for q, tok in enumerate(c)))
    return out


def sweep_logliks(
    peft_model,
    results: dict,
    path: Path,
    *,
    source: str,
    targets: Sequence[str],
    t_values: Sequence[float],
    score: Callable[[object, str], list[list[float]]],
    method: str = "adamergex",
    log: Callable[[str], None] = print,
    extra_key: str = "",
) -> dict:
    """Per target language and t: merge into the base (``merge_crosslingual_into_base``), score, undo.

    ``results["targets"][lang]["points"][f"{t:g}"]`` gets the (n, k) log-likelihoods; the JSON is
    rewritten after every point, and points already there are skipped (resumable).
    """
    from adamergex_peft import AdaMergeXConfig, merge_crosslingual_into_base

    for t in t_values:  # t outer: a run cut short still has every language at the first t values
        for lang in targets:
            entry = results["targets"][lang]
            key = f"{t:g}"
            if key in entry["points"]:
                continue
            clock = time.perf_counter()
            cfg = AdaMergeXConfig(
                task_adapter="task",
                source_reference_adapter=f"ref_{source}",
                target_reference_adapter=f"ref_{lang}",
                t=float(t),
                method=method,
            )
            handle = merge_crosslingual_into_base(peft_model, cfg)
            try:
                with peft_model.disable_adapter():
                    entry["points"][key] = score(peft_model, lang)
            finally:
                handle.undo()
            atomic_json(path, results)
            log(f"{extra_key}{lang} t={key}: {time.perf_counter() - clock:.1f}s")
    return results
