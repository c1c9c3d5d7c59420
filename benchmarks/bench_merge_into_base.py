"""Benchmark 3: merging three LoRA adapters into the base weights, Llama-2-7B layer shapes.

A Llama-2-7B-shaped model does not fit in this machine's 24 GiB in fp32 (27 GB), and these routes
read and write every targeted base weight, so the model has a FEW layers of 7B shape (default 2;
one layer is 202M parameters, 808 MB in fp32) with real (random) weights; time scales linearly with
the layer count (the work is per module). The three adapters (LoRA r=8 alpha=16 on q,k,v,o,gate,up,
down) are loaded with PEFT's defaults. Routes, each ending with a plain model holding merged weights:

* ``ours``: ``merge_crosslingual_into_base(model, cfg)`` then ``model.unload()``;
* ``ours_merge_only``: ``merge_crosslingual_into_base`` alone (adapters kept, e.g. for a t sweep);
* ``ours_undo``: ``handle.undo()`` after a merge (what a sweep pays per point to go back);
  the memory kept for the exact undo (``handle.undo_bytes``) is printed per dtype;
* ``peft_cat_merge_and_unload``: ``add_weighted_adapter(cat, [1, t, -t])`` then
  ``merge_and_unload(adapter_names=["merged"])``.

Goals (issue 5): ``ours`` at least 1.5x faster than the PEFT route, and no dense temporary larger
than one module's weight: the peak extra RSS is compared with the largest module weight (gate/up/
down, 11008 x 4096 elements) in the base dtype.

    python benchmarks/bench_merge_into_base.py            # 2 layers, fp32 and bf16 base
    python benchmarks/bench_merge_into_base.py --quick    # 1 layer
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

GOAL_SPEEDUP = 1.5
CASES = ("ours", "ours_merge_only", "ours_undo", "peft_cat_merge_and_unload")


def prepare(root: Path, n_layers: int) -> dict[str, Path]:
    import torch

    return {
        role: C.write_adapter(root / role, C.lora_config(), C.make_lora_state_dict(n_layers, torch.float32, seed))
        for role, seed in (("T", 1), ("Rs", 2), ("Rg", 3))
    }


class Route:
    """Holds the base model and re-wraps it with the three adapters (untimed) before each run."""

    def __init__(self, case: str, base, dirs: dict[str, Path]):
        self.case, self.base, self.dirs = case, base, dirs
        self.model = None
        self.handle = None
        self.cfg = C.adamergex_config()

    def setup(self) -> None:
        from adamergex_peft import merge_crosslingual_into_base

        if self.model is None:
            self.model = C.load_three(self.base, self.dirs, low_cpu_mem_usage=True)
        if self.case == "ours_undo":
            self.handle = merge_crosslingual_into_base(self.model, self.cfg)
        elif self.handle is not None and self.handle.merged:
            self.handle.undo()

    def run(self) -> None:
        from adamergex_peft import merge_crosslingual_into_base

        if self.case == "ours":
            merge_crosslingual_into_base(self.model, self.cfg)
            self.base = self.model.unload()
            self.model = None
        elif self.case == "ours_merge_only":
            self.handle = merge_crosslingual_into_base(self.model, self.cfg)
        elif self.case == "ours_undo":
            self.handle.undo()
        elif self.case == "peft_cat_merge_and_unload":
            self.model.add_weighted_adapter(["task", "ref_tgt", "ref_src"], [1.0, 1.0, -1.0], "merged", "cat")
            self.base = self.model.merge_and_unload(adapter_names=["merged"])
            self.model = None
        else:
            raise ValueError(self.case)


def child(args) -> None:
    dirs = {r: Path(args.dir) / r for r in ("T", "Rs", "Rg")}
    base = C.build_base(args.layers, C.dtype_of(args.dtype), materialize=True)
    route = Route(args.child, base, dirs)
    route.setup()
    route.run()  # warm-up
    route.setup()
    C.trim_heap()
    with C.PeakRSS() as probe:
        route.run()
    C.child_print({"extra": probe.extra})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 2; --quick: 1)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="base weight dtypes")
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    C.apply_threads(args)
    args.layers = args.layers or (1 if args.quick else 2)
    if args.child:
        child(args)
        return

    import torch

    env = C.environment()
    print(f"benchmark 3: three LoRA adapters into the base weights; {args.layers} Llama-2-7B layers; {env}")
    root = Path(tempfile.mkdtemp(prefix="adamergex-bench3-"))
    result = {"benchmark": "merge_into_base", "layers": args.layers, "reps": args.reps, "env": env, "dtypes": {}}
    rows = []
    try:
        dirs = prepare(root, args.layers)
        for dtype_name in args.dtypes.split(","):
            dtype = C.dtype_of(dtype_name)
            module_bytes = C.INTERMEDIATE * C.HIDDEN * torch.empty((), dtype=dtype).element_size()
            base = C.build_base(args.layers, dtype, materialize=True)
            times, mem, kept = {}, {}, {}
            # rounds: every route once per round (first round = warm-up), so load drift hits all alike
            for i in range(args.reps + 1):
                for case in CASES:
                    route = Route(case, base, dirs)
                    sample = C.time_reps(route.run, 1, warmup=0, setup=route.setup)
                    if i > 0:
                        times.setdefault(case, []).extend(sample)
                    if route.handle is not None and route.handle.merged:
                        kept = {"undo_bytes": route.handle.undo_bytes, "weight_bytes": route.handle.weight_bytes}
                        route.handle.undo()
                    base = route.base if route.model is None else route.model.unload()
                    C.trim_heap()
            del base, route
            C.trim_heap()
            for case in CASES:
                mem[case] = C.run_child(
                    Path(__file__),
                    ["--child", case, "--dir", str(root), "--dtype", dtype_name, "--layers", str(args.layers)],
                )["extra"]
            med = {k: C.median(v) for k, v in times.items()}
            peft = med["peft_cat_merge_and_unload"]
            for case in CASES:
                rows.append(
                    [
                        dtype_name,
                        case,
                        med[case],
                        C.spread(times[case]),
                        peft / med[case],
                        C.mib(mem[case]),
                        mem[case] / module_bytes,
                    ]
                )
            result["dtypes"][dtype_name] = {
                "largest_module_weight_bytes": module_bytes,
                "median_s": med,
                "all_s": times,
                "peak_extra_rss_bytes": mem,
                "speedup_ours_vs_peft": peft / med["ours"],
                "exact_undo_kept_bytes": kept.get("undo_bytes"),
                "merged_weight_bytes": kept.get("weight_bytes"),
                "goal_1.5x_faster": peft / med["ours"] >= GOAL_SPEEDUP,
                "goal_no_dense_temporary_above_one_module": mem["ours"] <= module_bytes,
            }
            print(f"[{dtype_name}] largest module weight (11008 x 4096): {C.mib(module_bytes):.1f} MiB")
            if kept:
                print(
                    f"[{dtype_name}] kept for exact undo: {C.mib(kept['undo_bytes']):.2f} MiB = "
                    f"{kept['undo_bytes'] / kept['weight_bytes']:.2%} of the merged weights "
                    f"({C.mib(kept['weight_bytes']):.0f} MiB), {kept['undo_bytes'] / module_bytes:.3f}x module"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    C.print_table(
        f"{args.layers} layers; median of {args.reps} runs after 1 warm-up round, routes interleaved (seconds); speed-up = PEFT route median / "
        "this median; x module = peak extra RSS / largest module weight (same dtype)",
        ["base dtype", "route", "median s", "min-max s", "speed-up vs PEFT", "peak extra RSS MiB", "x module"],
        rows,
    )
    C.print_result(result)


if __name__ == "__main__":
    main()
