"""Benchmark 6: a 5-point t sweep with ``adamergex sweep`` vs 5 separate ``lm_eval --model adamergex`` runs.

Same fixture as benchmark 5 (random ~28M-parameter Llama, three LoRA r=8 adapters, local task
``bench_mc``), t in {0, 0.25, 0.5, 0.75, 1}, same limit and batch size. Routes, as a user runs them:

* ``sweep``: ``adamergex sweep --t 0 0.25 0.5 0.75 1 ...`` (one process: loads the base and the three
  adapters once, then per point merges into the base in place, evaluates, undoes);
* ``separate``: 5 x ``lm_eval --model adamergex --model_args ...,t=<t>`` (``python -m adamergex_lm_eval``,
  the plugin's launcher, when the plugin's start-up hook is not installed), one after the other.

Both write nothing that the other reuses (each sweep run gets a fresh output folder, so nothing is
resumed). One untimed warm-up ``lm_eval`` run fills the page cache first; then ``--reps`` rounds,
each timing both routes back to back. Goal (issue 5): the sweep takes at least 2x less wall time.

Default ``--reps 3``: a round takes ~3 min on this shared 2-core machine, so 5 rounds would not fit
in the 10-minute budget of a benchmark; pass ``--reps 5`` on a quiet machine.

    python benchmarks/bench_sweep.py            # limit 50 documents per point
    python benchmarks/bench_sweep.py --quick    # limit 10, 1 round
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

GOAL = 2.0
T_VALUES = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, reps=5)
    parser.add_argument("--limit", type=int, default=None, help="documents per point (default 50; --quick: 10)")
    args = parser.parse_args()
    C.apply_threads(args)
    if args.quick:
        args.limit, args.reps = args.limit or 10, 1
    args.limit = args.limit or 50

    launcher, env = C.plugin_launcher()
    env["TQDM_DISABLE"] = "1"
    info = C.environment()
    root = Path(tempfile.mkdtemp(prefix="adamergex-bench6-"))
    result = {"benchmark": "sweep", "limit": args.limit, "reps": args.reps, "t": list(T_VALUES), "env": info}
    try:
        fx = C.build_eval_fixture(root)
        print(
            f"benchmark 6: 5-point t sweep; random Llama {fx['n_params'] / 1e6:.1f}M params; limit {args.limit}; {info}"
        )
        adapters = {
            "task_adapter": fx["T"],
            "source_reference_adapter": fx["Rs"],
            "target_reference_adapter": fx["Rg"],
        }

        def lm_eval_cmd(t: float, out: Path) -> list[str]:
            margs = ",".join([f"pretrained={fx['base']}", *(f"{k}={v}" for k, v in adapters.items()), f"t={t}"])
            return [
                *launcher, "--model", "adamergex", "--model_args", margs, "--tasks", "bench_mc",
                "--include_path", str(fx["tasks"]), "--limit", str(args.limit), "--batch_size", "16",
                "--output_path", str(out),
            ]  # fmt: skip

        def sweep_cmd(out: Path) -> list[str]:
            return [
                sys.executable, "-m", "adamergex_peft", "sweep", "--base-model", str(fx["base"]),
                "--task-adapter", str(fx["T"]), "--source-reference", str(fx["Rs"]),
                "--target-reference", str(fx["Rg"]), "--t", *map(str, T_VALUES), "--tasks", "bench_mc",
                "--include-path", str(fx["tasks"]), "--limit", str(args.limit), "--batch-size", "16",
                "--output", str(out), "--no-progress",
            ]  # fmt: skip

        def run(cmd: list[str]) -> float:
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            return time.perf_counter() - start

        run(lm_eval_cmd(1.0, root / "warmup"))  # warm-up: page cache, bytecode
        sweep_s, separate_s, per_run = [], [], []
        for i in range(args.reps):
            sweep_s.append(run(sweep_cmd(root / f"sweep{i}")))
            runs = [run(lm_eval_cmd(t, root / f"separate{i}_{t}")) for t in T_VALUES]
            per_run.extend(runs)
            separate_s.append(sum(runs))
        scores = json.loads((root / "sweep0" / "sweep_results.json").read_text())
        med_sweep, med_sep = C.median(sweep_s), C.median(separate_s)
        rows = [
            ["adamergex sweep (5 points)", med_sweep, C.spread(sweep_s), med_sep / med_sweep],
            ["5 x lm_eval --model adamergex", med_sep, C.spread(separate_s), 1.0],
            ["  one lm_eval run", C.median(per_run), C.spread(per_run), "-"],
        ]
        C.print_table(
            f"wall time, median of {args.reps} round(s) after 1 warm-up lm_eval run; x = separate / this route",
            ["route", "median s", "min-max s", "x less time than separate"],
            rows,
        )
        result.update(
            {
                "n_params": fx["n_params"],
                "sweep_s": sweep_s,
                "separate_s": separate_s,
                "one_lm_eval_run_s": per_run,
                "speedup": med_sep / med_sweep,
                "goal_2x_less_wall_time": med_sep / med_sweep >= GOAL,
                "sweep_points": scores.get("points", scores) if isinstance(scores, dict) else scores,
            }
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    C.print_result(result)


if __name__ == "__main__":
    main()
