"""Benchmark 2: building the merged adapter inside a PeftModel, Llama-2-7B shapes.

A ``LlamaForCausalLM`` with Llama-2-7B layer shapes (32 layers by default, vocabulary 256; weights
allocated but never written, so they cost no RSS: none of these routes reads the base weights) holds
three LoRA r=8 alpha=16 adapters (q,k,v,o,gate,up,down). Each route adds a merged adapter ``merged``:

* ``ours_exact``: ``merge_crosslingual(model, cfg, "merged")``, ``lora_strategy="exact"`` (rank 24);
* ``ours_svd``: the same with ``lora_strategy="svd", svd_rank=24`` (QR + SVD of a 24x24 core);
* ``ours_factorwise``: ``lora_strategy="factorwise"`` (rank 8, the official code's formula);
* ``peft_cat``: ``add_weighted_adapter([task, ref_tgt, ref_src], [1, t, -t], "merged", "cat")``;
* ``official_loop``: the official code's per-tensor loop, ``A' = A_T + t (A_Rg - A_Rs)`` and the same
  for ``B``, written into a new adapter's parameters one tensor at a time;
* ``peft_svd``: ``add_weighted_adapter(..., combination_type="svd", svd_rank=24)`` (PEFT's defaults,
  ``svd_full_matrices=True``). It forms the dense update and runs a full SVD of it: one 4096x4096
  module takes minutes on 2 cores, so it is measured on ONE q_proj-shaped module (one layer, one
  target module), once (no repetitions), against ``ours_svd`` on the same module.

Peak extra memory is RSS in a child process (see ``_common``) and, with a GPU, CUDA max allocated.
Goals (issue 5): ``ours_exact`` no slower than ``peft_cat``; its peak extra memory within 1.2x the
output adapter's size (no dense update formed).

    python benchmarks/bench_merge_in_model.py             # 32 layers, fp32 and bf16 adapters
    python benchmarks/bench_merge_in_model.py --quick     # 4 layers, no peft_svd
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

GOAL_MEMORY = 1.2
CASES = ("ours_exact", "ours_svd", "ours_factorwise", "peft_cat", "official_loop")


def prepare(root: Path, n_layers: int, dtype_name: str, modules=tuple(C.LORA_MODULES)) -> dict[str, Path]:
    dtype = C.dtype_of(dtype_name)
    config = C.lora_config()
    config.target_modules = list(modules)
    return {
        role: C.write_adapter(root / role, config, C.make_lora_state_dict(n_layers, dtype, seed, modules=modules))
        for role, seed in (("T", 1), ("Rs", 2), ("Rg", 3))
    }


def build_model(dirs: dict[str, Path], n_layers: int, dtype_name: str):
    """Base with the three adapters, kept in the files' dtype (no fp32 autocast) and on the GPU if any."""
    import torch

    base = C.build_base(n_layers, C.dtype_of(dtype_name), materialize=False)
    model = C.load_three(base, dirs, autocast_adapter_dtype=False)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model


def official_loop(model, t: float = 1.0) -> None:
    """The official code's per-tensor factor-wise merge, into a new adapter ``merged``."""
    import torch
    from peft.tuners.lora import LoraLayer

    model.add_adapter("merged", model.peft_config["task"], low_cpu_mem_usage=True)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer) or "merged" not in module.lora_A:
                continue
            for part in (module.lora_A, module.lora_B):
                task, tgt, src = (part[n].weight for n in ("task", "ref_tgt", "ref_src"))
                part["merged"].weight = torch.nn.Parameter(task + t * (tgt - src), requires_grad=False)


def operation(case: str, model):
    """``case`` as a zero-argument function adding adapter ``merged`` to ``model``."""
    from adamergex_peft import merge_crosslingual

    if case.startswith("ours_"):
        strategy = case[len("ours_") :]
        cfg = C.adamergex_config(lora_strategy=strategy, svd_rank=3 * C.RANK if strategy == "svd" else None)
        return lambda: merge_crosslingual(model, cfg, "merged")
    if case == "peft_cat":
        return lambda: model.add_weighted_adapter(["task", "ref_tgt", "ref_src"], [1.0, 1.0, -1.0], "merged", "cat")
    if case == "peft_svd":
        return lambda: model.add_weighted_adapter(
            ["task", "ref_tgt", "ref_src"], [1.0, 1.0, -1.0], "merged", "svd", svd_rank=3 * C.RANK
        )
    if case == "official_loop":
        return lambda: official_loop(model)
    raise ValueError(case)


def drop_merged(model) -> None:
    if "merged" in model.peft_config:
        model.delete_adapter("merged")


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child(args) -> None:
    """Peak extra memory of one case (fresh process): set up, warm up, drop, trim, measure once."""
    dirs = {r: Path(args.dir) / r for r in ("T", "Rs", "Rg")}
    model = build_model(dirs, args.layers, args.dtype)
    fn = operation(args.child, model)
    elapsed = None
    if args.child == "peft_svd":  # too slow to warm up at full size: warm LAPACK up on a small matrix
        import torch

        torch.linalg.svd(torch.randn(256, 256))
    else:
        fn()
        drop_merged(model)
    C.trim_heap()
    with C.PeakRSS() as probe:
        start = time.perf_counter()
        fn()
        synchronize()
        elapsed = time.perf_counter() - start
    C.child_print({"extra": probe.extra, "cuda_extra": probe.cuda_extra, "seconds": elapsed})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --quick: 4)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--no-peft-svd", action="store_true", help="skip the single-module PEFT svd run")
    parser.add_argument("--only-peft-svd", action="store_true", help="run only the single-module svd comparison")
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    C.apply_threads(args)
    args.layers = args.layers or (4 if args.quick else C.N_LAYERS_7B)
    if args.child:
        child(args)
        return

    env = C.environment()
    print(f"benchmark 2: merged adapter inside a PeftModel; {args.layers} Llama-2-7B layers; {env}")
    root = Path(tempfile.mkdtemp(prefix="adamergex-bench2-"))
    result = {"benchmark": "merge_in_model", "layers": args.layers, "reps": args.reps, "env": env, "dtypes": {}}
    rows = []
    try:
        for dtype_name in [] if args.only_peft_svd else args.dtypes.split(","):
            dirs = prepare(root / dtype_name, args.layers, dtype_name)
            model = build_model(dirs, args.layers, dtype_name)
            times, mem, cuda = {}, {}, {}
            fns = {case: operation(case, model) for case in CASES}
            # rounds: every case once per round (first round = warm-up), so load drift hits all alike
            for i in range(args.reps + 1):
                for case in CASES:
                    drop_merged(model)
                    sample = C.time_reps(lambda fn=fns[case]: (fn(), synchronize()), 1, warmup=0)
                    if i > 0:
                        times.setdefault(case, []).extend(sample)
                    if case == "ours_exact":
                        out_bytes = sum(
                            p.numel() * p.element_size() for n, p in model.named_parameters() if ".merged." in n
                        )
            drop_merged(model)
            model = None
            C.trim_heap()
            for case in CASES:
                probe = C.run_child(
                    Path(__file__),
                    [
                        "--child",
                        case,
                        "--dir",
                        str(root / dtype_name),
                        "--dtype",
                        dtype_name,
                        "--layers",
                        str(args.layers),
                    ],
                )
                mem[case], cuda[case] = probe["extra"], probe["cuda_extra"]
            med = {k: C.median(v) for k, v in times.items()}
            for case in CASES:
                rows.append(
                    [
                        dtype_name,
                        case,
                        med[case],
                        C.spread(times[case]),
                        med[case] / med["peft_cat"],
                        C.mib(mem[case]),
                        mem[case] / out_bytes,
                        "-" if cuda[case] is None else C.mib(cuda[case]),
                    ]
                )
            result["dtypes"][dtype_name] = {
                "output_adapter_bytes_exact": out_bytes,
                "median_s": med,
                "all_s": times,
                "peak_extra_rss_bytes": mem,
                "peak_extra_cuda_bytes": cuda,
                "ours_exact_vs_peft_cat": med["ours_exact"] / med["peft_cat"],
                "ours_exact_mem_vs_output": mem["ours_exact"] / out_bytes,
                "goal_no_slower_than_peft_cat": med["ours_exact"] <= med["peft_cat"],
                "goal_mem_within_1.2x_output": mem["ours_exact"] / out_bytes <= GOAL_MEMORY,
            }
            print(f"[{dtype_name}] output adapter (exact, rank 24): {C.mib(out_bytes):.1f} MiB")
        if rows:
            C.print_table(
                f"{args.layers} layers; median of {args.reps} runs after 1 warm-up round, cases interleaved (seconds); "
                "x cat = median / peft_cat median; x out = peak extra RSS / size of the exact (rank-24) output adapter",
                ["dtype", "route", "median s", "min-max s", "x cat", "peak extra RSS MiB", "x out", "CUDA peak MiB"],
                rows,
            )
        if not args.quick and not args.no_peft_svd:
            result["one_module_svd"] = one_module_svd(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    C.print_result(result)


def one_module_svd(root: Path, args) -> dict:
    """PEFT svd vs ours svd on one q_proj-shaped (4096 x 4096) module, fp32."""
    dirs = prepare(root / "one_module", 1, "fp32", modules=("q_proj",))
    model = build_model(dirs, 1, "fp32")
    fn = operation("ours_svd", model)
    ours = C.time_reps(lambda: (fn(), synchronize()), args.reps, setup=lambda: drop_merged(model))
    model = fn = None
    common = ["--dir", str(root / "one_module"), "--dtype", "fp32", "--layers", "1"]
    ours_child = C.run_child(Path(__file__), ["--child", "ours_svd", *common])
    peft_child = C.run_child(Path(__file__), ["--child", "peft_svd", *common], timeout=1200)
    out_bytes = 3 * C.RANK * (2 * C.HIDDEN) * 4
    rows = [
        ["ours_svd", C.median(ours), f"median of {args.reps}", C.mib(ours_child["extra"])],
        ["peft_svd", peft_child["seconds"], "1 run", C.mib(peft_child["extra"])],
    ]
    C.print_table(
        "one q_proj-shaped module (4096 x 4096), fp32, rank-24 output "
        f"({C.mib(out_bytes):.2f} MiB); peft_svd = add_weighted_adapter(svd, svd_rank=24), PEFT defaults",
        ["route", "seconds", "timing", "peak extra RSS MiB"],
        rows,
    )
    return {
        "ours_svd_median_s": C.median(ours),
        "ours_svd_all_s": ours,
        "peft_svd_s_single_run": peft_child["seconds"],
        "ours_svd_peak_extra_rss_bytes": ours_child["extra"],
        "peft_svd_peak_extra_rss_bytes": peft_child["extra"],
        "peft_svd_vs_ours_svd_time": peft_child["seconds"] / C.median(ours),
    }


if __name__ == "__main__":
    main()
