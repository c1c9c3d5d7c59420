"""Per-item choice log-likelihoods of a t sweep on the demo world (``adamergex demo``), for ``analyze.py``.

Runs ``adamergex_peft.demo.pipeline.run_demo`` once (the synthetic world, the tiny pretrained Llama, the
LoRA and (IA)^3 adapters; skipped when ``--demo-output`` already holds them), then reuses its files --
``base_model/``, ``adapters/<family>/{task,ref_<lang>,oracle_<lang>}``, ``world/<lang>.test.jsonl`` --
and, per family, target language and t, merges into the base (``merge_crosslingual_into_base``),
scores every choice of every test item (the demo task's lm-eval prompt: ``prompt`` + ``" " + choice``)
and undoes the merge. Nothing of the demo is modified.

Writes ``logliks_demo_<family>.json`` (the format of ``run_gemma.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import atomic_json, choice_logliks, sweep_logliks  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-output", default=str(HERE / "runs" / "demo_world"), help="where run_demo writes")
    ap.add_argument("--output", default=str(HERE / "results"), help="folder for logliks_demo_<family>.json")
    ap.add_argument("--t", nargs="+", type=float, default=[0, 0.25, 0.5, 0.75, 1, 1.25, 1.5])
    ap.add_argument("--families", nargs="+", default=["lora", "ia3"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adamergex_peft import AdaMergeXError
    from adamergex_peft.data import read_jsonl
    from adamergex_peft.demo.pipeline import run_demo

    demo = Path(args.demo_output)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    if not (demo / "demo_results.json").exists():
        run_demo(demo, seed=args.seed, log=log)
    demo_json = json.loads((demo / "demo_results.json").read_text())
    source, targets = demo_json["source"], demo_json["targets"]
    tokenizer = AutoTokenizer.from_pretrained(demo / "base_model")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    test = {lang: list(read_jsonl(demo / "world" / f"{lang}.test.jsonl")) for lang in [source, *targets]}
    for lang in targets:  # parallel: same meanings, same labels, item by item
        assert [r["label"] for r in test[lang]] == [r["label"] for r in test[source]], lang

    def score(m, lang: str):
        items = test[lang]
        return choice_logliks(
            m,
            tokenizer,
            [r["prompt"] for r in items],
            [[" " + c for c in r["choices"]] for r in items],
            batch_size=64,
            add_bos=False,
        )

    for family in args.families:
        path = out_dir / f"logliks_demo_{family}.json"
        model = AutoModelForCausalLM.from_pretrained(demo / "base_model", dtype=torch.float32).eval()
        fam = demo / "adapters" / family
        peft_model = PeftModel.from_pretrained(model, fam / "task", adapter_name="task")
        for lang in [source, *targets]:
            peft_model.load_adapter(fam / f"ref_{lang}", adapter_name=f"ref_{lang}")
        for lang in targets:
            peft_model.load_adapter(fam / f"oracle_{lang}", adapter_name=f"oracle_{lang}")
        peft_model.eval()
        results = (
            json.loads(path.read_text())
            if path.exists()
            else {
                "testbed": f"demo world ({family}): 4-way topic task, tiny Llama pretrained from scratch (adamergex demo, seed {args.seed})",
                "choices": ["topic0", "topic1", "topic2", "topic3"],
                "settings": {"t": args.t, "seed": args.seed, "family": family},
                "source": {"lang": source},
                "targets": {},
            }
        )
        if "loglik" not in results["source"]:
            peft_model.set_adapter("task")
            results["source"].update(labels=[r["label"] for r in test[source]], loglik=score(peft_model, source))
        for lang in targets:
            entry = results["targets"].setdefault(lang, {"labels": [r["label"] for r in test[lang]], "points": {}})
            if "oracle_loglik" not in entry:
                peft_model.set_adapter(f"oracle_{lang}")
                entry["oracle_loglik"] = score(peft_model, lang)
        peft_model.set_adapter("task")
        atomic_json(path, results)
        try:
            sweep_logliks(
                peft_model,
                results,
                path,
                source=source,
                targets=targets,
                t_values=args.t,
                score=score,
                log=log,
                extra_key=f"{family} ",
            )
        except AdaMergeXError as err:  # e.g. an (IA)^3 ratio the merge refuses at some t
            log(f"{family}: merge refused: {err}")
        log(f"{family}: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
