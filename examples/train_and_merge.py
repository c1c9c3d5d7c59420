"""Train the three AdaMergeX adapters and merge them with ``model.merge_crosslingual``, in one script.

The same steps as the CLI workflow (``adamergex build-reference-data`` / ``train`` / ``sweep``), from
Python. It runs as is on CPU in about a minute with a tiny model built in code, offline:

    python examples/train_and_merge.py --output /tmp/adamergex_example

With a real model and real data (the paper's setting, on a GPU):

    python examples/train_and_merge.py --base-model meta-llama/Llama-2-7b-hf --recipe llama2-7b-lora \\
        --task-data task.en.jsonl --source-text wiki.en.txt --target-text wiki.sw.txt --target-lang sw \\
        --output runs/sw

Task data is JSONL of {"prompt": ..., "completion": ...}; the texts are plain text files.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def tiny_setup(folder: Path):
    """A toy base model, tokenizer and data (source 'src', target 'tgA') from the demo's world."""
    from adamergex_peft.data import write_jsonl
    from adamergex_peft.demo.lm import TinyLMSize, build_tiny_llama, pretrain_causal_lm
    from adamergex_peft.demo.tokenizer import build_word_tokenizer
    from adamergex_peft.demo.world import build_languages, task_examples, unlabelled_text

    src, tgt = build_languages(num_targets=1, seed=0)
    texts = {lang.code: unlabelled_text(lang, 1500, seed=i) for i, lang in enumerate((src, tgt))}
    task = task_examples(src, 200, seed=1)
    tokenizer = build_word_tokenizer(
        [line for lines in texts.values() for line in lines]
        + [r["prompt"] + r["completion"] for r in task_examples(tgt, 50, 2) + task]
    )
    model = build_tiny_llama(tokenizer, TinyLMSize(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256))
    pretrain_causal_lm(
        model,
        tokenizer,
        texts["src"] + texts["tgA"],
        str(folder / "pretrain"),
        max_length=64,
        batch_size=16,
        epochs=1,
        learning_rate=1e-2,
    )
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    for code, lines in texts.items():
        (folder / f"{code}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in task], folder / "task.src.jsonl")
    return str(folder / "base"), folder / "task.src.jsonl", folder / "src.txt", folder / "tgA.txt", "src", "tgA"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", help="Base model (default: a tiny model built and pretrained here).")
    parser.add_argument(
        "--recipe", default="cpu-small-lora", help="Training recipe (see `adamergex train --list-recipes`)."
    )
    parser.add_argument("--task-data", help="Source-language task data (JSONL prompt/completion).")
    parser.add_argument("--source-text", help="Source-language plain text.")
    parser.add_argument("--target-text", help="Target-language plain text.")
    parser.add_argument("--source-lang", default="en")
    parser.add_argument("--target-lang", default="sw")
    parser.add_argument(
        "--window-size", type=int, default=None, help="Reference window (default: 512, or 32 for the toy)."
    )
    parser.add_argument("--t", type=float, default=1.0)
    parser.add_argument("--output", default="adamergex_example")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    if args.base_model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        base, task_data, source_text, target_text, source_lang, target_lang = tiny_setup(output / "toy")
        window = args.window_size or 32
    else:
        base, task_data, source_text, target_text = args.base_model, args.task_data, args.source_text, args.target_text
        source_lang, target_lang = args.source_lang, args.target_lang
        window = args.window_size or 512

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import adamergex_peft  # noqa: F401  (attaches PeftModel.merge_crosslingual)
    from adamergex_peft import AdaMergeXConfig
    from adamergex_peft.data import build_reference_data
    from adamergex_peft.train import train_adapter

    # 1. Reference data: plain text cut into windows (the reference task is causal LM).
    build_reference_data([source_text], output / "ref.src.jsonl", source_lang, window_size=window, max_windows=20000)
    build_reference_data([target_text], output / "ref.tgt.jsonl", target_lang, window_size=window, max_windows=20000)

    # 2. The three adapters, with the same recipe.
    overrides = {"save_strategy": "no"} if args.base_model is None else None
    train_adapter(base, task_data, output / "task", kind="task", recipe=args.recipe, overrides=overrides)
    train_adapter(
        base, output / "ref.src.jsonl", output / "ref_src", kind="reference", recipe=args.recipe, overrides=overrides
    )
    train_adapter(
        base, output / "ref.tgt.jsonl", output / "ref_tgt", kind="reference", recipe=args.recipe, overrides=overrides
    )

    # 3. Merge inside one PeftModel: model.merge_crosslingual builds a plain LoRA/(IA)^3 adapter.
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(model, output / "task", adapter_name="task")
    model.load_adapter(output / "ref_src", adapter_name="ref_src")
    model.load_adapter(output / "ref_tgt", adapter_name="ref_tgt")
    config = AdaMergeXConfig(
        task_adapter="task", source_reference_adapter="ref_src", target_reference_adapter="ref_tgt", t=args.t
    )
    name = model.merge_crosslingual(config, f"task_{target_lang}")
    model.set_adapter(name)
    model.save_pretrained(output / "merged", selected_adapters=[name])  # a standard PEFT folder (sub-folder <name>)
    config.save_pretrained(output / "merged" / name)
    print(f"merged adapter saved to {output / 'merged' / name}")

    # 4. Use it: one prompt, greedy.
    with open(task_data, encoding="utf-8") as handle:
        prompt = json.loads(handle.readline())["prompt"]
    inputs = tokenizer(prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    print(prompt, "->", tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
