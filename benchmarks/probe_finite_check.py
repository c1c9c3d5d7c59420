"""Probe: what the engine's NaN/Inf check costs, and a cheaper exact alternative.

``adamergex_peft.merge._check_finite`` runs ``torch.isfinite(t).all()`` on every input tensor (and
``_merge_lora`` again on every output factor). For three Llama-2-7B LoRA adapters (32 layers,
r=8) that is 1,344 input tensors + 448 output tensors, ~2,000 small parallel kernels. This probe
times, for the three adapters' tensors (inputs only):

* ``isfinite_all``: ``torch.isfinite(t).all()`` (what the library does);
* ``isfinite_amax``: ``torch.isfinite(t.abs().amax())`` (exact too: ``amax`` propagates NaN, and an
  Inf entry makes the maximum Inf);

each with 1 thread and with torch's default thread count, medians of ``--reps`` after a warm-up.
On a machine where other processes keep the cores busy, every parallel region waits for its
descheduled worker thread, so thousands of tiny parallel kernels cost seconds.

    python benchmarks/probe_finite_check.py            # 32 layers, fp32 and bf16
    python benchmarks/probe_finite_check.py --quick    # 4 layers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --quick: 4)")
    args = parser.parse_args()
    args.layers = args.layers or (4 if args.quick else C.N_LAYERS_7B)

    import torch

    default_threads = torch.get_num_threads()
    env = C.environment()
    print(f"probe: NaN/Inf check of three LoRA adapters; {args.layers} Llama-2-7B layers; {env}")
    checks = {
        "isfinite_all": lambda t: bool(torch.isfinite(t).all()),
        "isfinite_amax": lambda t: bool(torch.isfinite(t.abs().amax())),
    }
    rows, result = [], {"benchmark": "finite_check", "layers": args.layers, "reps": args.reps, "env": env, "s": {}}
    for dtype_name in ("fp32", "bf16"):
        dtype = C.dtype_of(dtype_name)
        tensors = [
            t for seed in (1, 2, 3) for t in C.make_lora_state_dict(args.layers, dtype, seed).values()
        ]  # 3 adapters
        bad = tensors[0].clone()
        bad[0, 0] = float("nan")
        assert not any(check(bad) for check in checks.values())
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            for name, check in checks.items():
                times = C.time_reps(lambda check=check, tensors=tensors: [check(t) for t in tensors], args.reps)
                rows.append([dtype_name, threads, name, len(tensors), C.median(times), C.spread(times)])
                result["s"][f"{dtype_name}|{threads}|{name}"] = times
    torch.set_num_threads(default_threads)
    C.print_table(
        f"seconds to check all tensors of 3 adapters, median of {args.reps} after 1 warm-up",
        ["dtype", "threads", "check", "tensors", "median s", "min-max s"],
        rows,
    )
    C.print_result(result)


if __name__ == "__main__":
    main()
