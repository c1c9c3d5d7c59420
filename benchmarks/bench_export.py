"""Benchmark 9: full-model export, shard by shard, vs the PEFT route.

A random Llama (default ~180M parameters in fp32, saved in 4+ safetensors shards; ``--quick``: ~35M)
and a merged LoRA adapter (``merge_adapter_files`` of three random r=8 adapters on q,k,v,o,gate,up,
down: rank 24) are written to a temporary folder. Both routes start from these two folders and end
with a plain transformers model folder in the base's dtype:

* ``ours``: ``export_merged_model(base_dir, merged_dir, out)`` (safe_open per shard, update, write, free);
* ``peft_merge_and_unload``: ``AutoModelForCausalLM.from_pretrained(base_dir)`` +
  ``PeftModel.from_pretrained(model, merged_dir)`` + ``merge_and_unload()`` +
  ``save_pretrained(out, max_shard_size=<same>)``.

Each run is a fresh child process (libraries imported before the probe); peak extra RSS is
``VmHWM - RSS`` before the operation (see ``_common.py``). File pages that safetensors memory-maps
count as resident while they are mapped, for both routes alike. Goal (issue 12): peak memory about
one shard plus the adapter, not the whole model; checked as ``peak extra <= 2 x largest shard``
(the mapped source shard + one tensor's work copy + the adapter, read and parsed) and below the
PEFT route. The table gives the peak in units of the largest shard and of the whole checkpoint.

    python benchmarks/bench_export.py --quick --threads 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CASES = ("ours", "peft_merge_and_unload")
SIZES = {  # hidden, intermediate, layers, vocab, max_shard_size
    "quick": (512, 1408, 8, 8000, "40MB"),
    "full": (1024, 2816, 12, 16000, "200MB"),
}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def prepare(root: Path, size: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from adamergex_peft import AdaMergeXConfig, merge_adapter_files

    hidden, inter, layers, vocab, shard = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=vocab,
        max_position_embeddings=256,
    )
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base", max_shard_size=shard)
    dirs = []
    for seed, name in enumerate(("T", "Rs", "Rg")):
        model = get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, target_modules=list(MODULES), init_lora_weights=False)
        )
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_" in pname:
                    param.copy_(0.02 * torch.randn(param.shape, generator=gen))
        model.save_pretrained(root / name)
        base = model.unload()
        dirs.append(root / name)
    merge_adapter_files(*dirs, root / "merged", AdaMergeXConfig("a", "b", "c", t=0.8))
    shards = [p for p in (root / "base").iterdir() if p.suffix == ".safetensors"]
    return {
        "params": sum(p.numel() for p in base.parameters()),
        "shards": len(shards),
        "largest_shard_bytes": max(p.stat().st_size for p in shards),
        "checkpoint_bytes": sum(p.stat().st_size for p in shards),
        "adapter_bytes": (root / "merged" / "adapter_model.safetensors").stat().st_size,
        "max_shard_size": shard,
    }


def run_case(case: str, root: Path, out: Path, shard: str) -> None:
    if case == "ours":
        from adamergex_peft.export import export_merged_model

        export_merged_model(root / "base", root / "merged", out)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(root / "base")
        model = PeftModel.from_pretrained(model, root / "merged")
        model = model.merge_and_unload()
        model.save_pretrained(out, max_shard_size=shard)


def child(args) -> None:
    import logging

    import peft  # noqa: F401  (imports outside the probe, for both routes)
    import transformers
    from transformers import LlamaForCausalLM  # noqa: F401

    import adamergex_peft.export  # noqa: F401

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    os.environ["TQDM_DISABLE"] = "1"
    root, out = Path(args.dir), Path(args.dir) / f"out_{args.child}"
    shutil.rmtree(out, ignore_errors=True)
    C.trim_heap()
    with C.PeakRSS() as probe:
        start = time.perf_counter()
        run_case(args.child, root, out, args.shard)
        elapsed = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    C.child_print({"extra": probe.extra, "seconds": elapsed})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, reps=3)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--shard", help=argparse.SUPPRESS)
    args = parser.parse_args()
    C.apply_threads(args)
    if args.child:
        child(args)
        return

    size = "quick" if args.quick else "full"
    reps = 1 if args.quick else args.reps
    env = C.environment()
    print(f"benchmark 9: full-model export, shard by shard, vs PEFT merge_and_unload + save_pretrained; {env}")
    root = Path(tempfile.mkdtemp(prefix="adamergex-bench9-"))
    try:
        info = prepare(root, size)
        print(
            f"model: {info['params'] / 1e6:.0f}M parameters (fp32), {info['shards']} shards, largest "
            f"{C.mib(info['largest_shard_bytes']):.0f} MiB, checkpoint {C.mib(info['checkpoint_bytes']):.0f} MiB; "
            f"merged adapter {C.mib(info['adapter_bytes']):.1f} MiB"
        )
        times: dict[str, list[float]] = {}
        mem: dict[str, list[int]] = {}
        # rounds: every route once per round in its own process (round 0 = warm-up: page cache)
        for i in range(reps + 1):
            for case in CASES:
                got = C.run_child(
                    Path(__file__), ["--child", case, "--dir", str(root), "--shard", info["max_shard_size"]]
                )
                if i > 0:
                    times.setdefault(case, []).append(got["seconds"])
                    mem.setdefault(case, []).append(got["extra"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med_t = {k: C.median(v) for k, v in times.items()}
    med_m = {k: C.median(v) for k, v in mem.items()}
    rows = [
        [
            case,
            med_t[case],
            C.spread(times[case]),
            med_t["peft_merge_and_unload"] / med_t[case],
            C.mib(med_m[case]),
            med_m[case] / info["largest_shard_bytes"],
            med_m[case] / info["checkpoint_bytes"],
        ]
        for case in CASES
    ]
    C.print_table(
        f"{size}: median of {reps} run(s) after 1 warm-up round, each run a fresh process (seconds); speed-up = PEFT "
        "median / this median; peak extra RSS in MiB, in largest shards and in whole checkpoints",
        [
            "route",
            "median s",
            "min-max s",
            "speed-up vs PEFT",
            "peak extra RSS MiB",
            "x largest shard",
            "x checkpoint",
        ],
        rows,
    )
    C.print_result(
        {
            "benchmark": "export",
            "size": size,
            "reps": reps,
            "env": env,
            "model": info,
            "median_s": med_t,
            "all_s": times,
            "peak_extra_rss_bytes": med_m,
            "speedup_ours_vs_peft": med_t["peft_merge_and_unload"] / med_t["ours"],
            "memory_ratio_peft_over_ours": med_m["peft_merge_and_unload"] / max(1, med_m["ours"]),
            "goal_peak_at_most_two_shards": med_m["ours"] <= 2 * info["largest_shard_bytes"],
            "goal_peak_below_peft_route": med_m["ours"] < med_m["peft_merge_and_unload"],
        }
    )


if __name__ == "__main__":
    main()
