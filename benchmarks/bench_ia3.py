"""Benchmark 4: (IA)^3 merge, both strategies, against a plain PyTorch loop over the vectors.

Three (IA)^3 adapters on k_proj, v_proj (vectors 4096 x 1) and down_proj (1 x 11008) of 32
Llama-2-7B layers (19,200 values per layer). Routes, on the same state dicts in memory:

* ``ours_linear`` / ``ours_power``: ``adamergex_peft.merge.merge_state_dicts`` (the engine behind every
  front end: validation, finite checks, denominator checks, the output config);
* ``plain_linear`` / ``plain_power``: a dict comprehension, ``l_T * (t * (l_Rg / l_Rs - 1) + 1)`` and
  ``l_T * (l_Rg / l_Rs) ** t`` per key, nothing checked;
* ``ours_files``: ``merge_adapter_files`` (load, merge, write) and ``io_floor`` (load 3 + save 1).

No goal is set by issue 5; the table shows what the validation costs.

    python benchmarks/bench_ia3.py            # 32 layers, fp32 and bf16
    python benchmarks/bench_ia3.py --quick    # 4 layers
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CASES = ("plain_linear", "ours_linear", "plain_power", "ours_power", "io_floor", "ours_files")


def routes(dtype_name: str, n_layers: int, root: Path, t: float):
    """The six routes of one dtype as zero-argument functions, and the task adapter's state dict."""
    from safetensors.torch import load_file, save_file

    from adamergex_peft import merge_adapter_files
    from adamergex_peft.merge import AdapterWeights, merge_state_dicts

    dtype = C.dtype_of(dtype_name)
    sds = {role: C.make_ia3_state_dict(n_layers, dtype, seed) for role, seed in (("T", 1), ("Rs", 2), ("Rg", 3))}
    dirs = {role: C.write_adapter(root / dtype_name / role, C.ia3_config(), sd) for role, sd in sds.items()}
    adapters = {role: AdapterWeights(role, C.ia3_config(), sd) for role, sd in sds.items()}
    cfgs = {s: C.adamergex_config(ia3_strategy=s, t=t) for s in ("linear", "power")}
    out_sd = merge_state_dicts(adapters["T"], adapters["Rs"], adapters["Rg"], cfgs["linear"]).state_dict
    T, S, G = sds["T"], sds["Rs"], sds["Rg"]

    def plain_linear():
        # float32 arithmetic and output in the input dtype, like the engine
        return {k: (T[k].float() * (t * (G[k].float() / S[k].float() - 1.0) + 1.0)).to(dtype) for k in T}

    def plain_power():
        return {k: (T[k].float() * (G[k].float() / S[k].float()).pow(t)).to(dtype) for k in T}

    def io_floor():
        for role in ("T", "Rs", "Rg"):
            load_file(str(dirs[role] / "adapter_model.safetensors"))
        target = root / dtype_name / "floor.safetensors"
        target.unlink(missing_ok=True)  # a fresh file, as merge_adapter_files writes a new folder
        save_file(out_sd, str(target), metadata={"format": "pt"})

    fns = {
        "plain_linear": plain_linear,
        "plain_power": plain_power,
        "ours_linear": lambda: merge_state_dicts(adapters["T"], adapters["Rs"], adapters["Rg"], cfgs["linear"]),
        "ours_power": lambda: merge_state_dicts(adapters["T"], adapters["Rs"], adapters["Rg"], cfgs["power"]),
        "io_floor": io_floor,
        "ours_files": lambda: merge_adapter_files(
            dirs["T"], dirs["Rs"], dirs["Rg"], root / dtype_name / "out", overwrite=True
        ),
    }
    return fns, T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, reps=20)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --quick: 4)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    C.apply_threads(args)
    args.layers = args.layers or (4 if args.quick else C.N_LAYERS_7B)

    import torch

    env = C.environment()
    print(f"benchmark 4: (IA)^3 merge; {args.layers} Llama-2-7B layers (k, v, down); {env}")
    root = Path(tempfile.mkdtemp(prefix="adamergex-bench4-"))
    result = {"benchmark": "ia3", "layers": args.layers, "reps": args.reps, "env": env, "dtypes": {}}
    rows = []
    t = 1.0
    try:
        for dtype_name in args.dtypes.split(","):
            fns, T = routes(dtype_name, args.layers, root, t)
            # sanity: the plain loop and the engine agree
            ours = fns["ours_linear"]().state_dict
            plain = fns["plain_linear"]()
            assert all(torch.equal(ours[k], plain[k]) for k in plain), "plain loop and engine disagree"
            times = {case: C.time_reps(fns[case], args.reps) for case in CASES}
            med = {k: C.median(v) for k, v in times.items()}
            for case in CASES:
                ref = {"ours_linear": "plain_linear", "ours_power": "plain_power", "ours_files": "io_floor"}.get(case)
                rows.append(
                    [
                        dtype_name,
                        case,
                        med[case] * 1e3,
                        C.spread([x * 1e3 for x in times[case]]),
                        med[case] / med[ref] if ref else "-",
                    ]
                )
            result["dtypes"][dtype_name] = {
                "values_per_adapter": sum(v.numel() for v in T.values()),
                "median_s": med,
                "all_s": times,
                "ours_linear_vs_plain": med["ours_linear"] / med["plain_linear"],
                "ours_power_vs_plain": med["ours_power"] / med["plain_power"],
                "ours_files_vs_floor": med["ours_files"] / med["io_floor"],
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    C.print_table(
        f"{args.layers} layers; median of {args.reps} runs after 1 warm-up (milliseconds); x ref = ours / plain loop "
        "(or / io_floor for files)",
        ["dtype", "route", "median ms", "min-max ms", "x ref"],
        rows,
    )
    C.print_result(result)


if __name__ == "__main__":
    main()
