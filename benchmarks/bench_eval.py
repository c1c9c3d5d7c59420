"""Benchmark 5: evaluation cost of ``lm_eval --model adamergex`` vs ``--model hf`` (bare base) vs
``--model hf,peft=<merged adapter>`` (unmerged), same task and limit, on a random Llama of ~28M parameters.

Fixture (built offline, see ``_common.build_eval_fixture``): a random Llama (hidden 512, 8 layers,
~28M parameters) with a local BPE tokenizer; three LoRA adapters (r=8, alpha=16, all 7 projections);
the merged adapter (AdaMergeX exact, rank 24) written by ``merge_adapter_files``; a local
multiple-choice task ``bench_mc`` (acc; two loglikelihood requests per document).

Routes (lm-eval's own model classes, as the CLI builds them):

* ``adamergex``: ``AdaMergeXLM`` (the plugin class behind ``--model adamergex``; merged into the base
  weights and unloaded, its default);
* ``hf_bare``: ``HFLM(pretrained=base)``;
* ``hf_peft_unmerged``: ``HFLM(pretrained=base, peft=merged adapter)``.

Measured: (a) evaluation, ``lm_eval.simple_evaluate(model=<LM>, tasks=["bench_mc"], limit=N)`` on an
already-built model, and (b) model construction (load base, adapters, merge), each the median of
``--reps`` runs after a warm-up, the routes interleaved inside every repetition so that the load of
other processes on this shared machine hits all routes alike; (c) with ``--cli-reps K`` (default 1),
the whole command line per route (``python -m adamergex_lm_eval`` for all three, so interpreter and
import costs are the same; that is lm-eval's CLI with the plugin registered), K runs each.

Goal (issue 5): ``adamergex`` evaluation within 3% of ``hf_bare``; the unmerged cost is reported.

    python benchmarks/bench_eval.py            # limit 100 documents (200 requests), batch 16
    python benchmarks/bench_eval.py --quick    # limit 25, no CLI runs
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

GOAL = 0.03
ROUTES = ("hf_bare", "adamergex", "hf_peft_unmerged")


def model_args(route: str, fx: dict) -> dict:
    args = {"pretrained": str(fx["base"]), "batch_size": 16, "device": "cpu", "dtype": "float32"}
    if route == "adamergex":
        args.update(
            task_adapter=str(fx["T"]), source_reference_adapter=str(fx["Rs"]), target_reference_adapter=str(fx["Rg"])
        )
    elif route == "hf_peft_unmerged":
        args["peft"] = str(fx["merged"])
    return args


def build_lm(route: str, fx: dict):
    from lm_eval.models.huggingface import HFLM

    if route == "adamergex":
        from adamergex_lm_eval.model import AdaMergeXLM

        return AdaMergeXLM(**model_args(route, fx))
    return HFLM(**model_args(route, fx))


def quiet() -> None:
    for name in ("lm_eval", "lm-eval", "transformers", "datasets", "peft", "accelerate", "adamergex_peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--limit", type=int, default=None, help="documents (default 100; --quick: 25)")
    parser.add_argument("--cli-reps", type=int, default=None, help="whole-CLI runs per route (default 1; --quick: 0)")
    args = parser.parse_args()
    C.apply_threads(args)
    args.limit = args.limit or (25 if args.quick else 100)
    args.cli_reps = (0 if args.quick else 1) if args.cli_reps is None else args.cli_reps

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    launcher, cli_env = C.plugin_launcher()
    sys.path.insert(0, str(C.ROOT / "plugins"))  # the plugin class, when not installed
    quiet()
    import lm_eval
    from lm_eval.tasks import TaskManager

    env = C.environment()
    root = Path(tempfile.mkdtemp(prefix="adamergex-bench5-"))
    result = {"benchmark": "eval", "limit": args.limit, "reps": args.reps, "env": env}
    try:
        fx = C.build_eval_fixture(root)
        print(
            f"benchmark 5: evaluation overhead; random Llama {fx['n_params'] / 1e6:.1f}M params; limit {args.limit}; {env}"
        )
        tm = TaskManager(include_path=str(fx["tasks"]), include_defaults=False)

        def evaluate(lm):
            out = lm_eval.simple_evaluate(
                model=lm, tasks=["bench_mc"], limit=args.limit, task_manager=tm, log_samples=False, bootstrap_iters=0
            )
            return out["results"]["bench_mc"]["acc,none"]

        build = {r: [] for r in ROUTES}
        evals = {r: [] for r in ROUTES}
        scores = {}
        lms = {}
        for i in range(args.reps + 1):  # first round: warm-up
            for route in ROUTES:
                lms.pop(route, None)
                C.trim_heap()
                start = time.perf_counter()
                lms[route] = build_lm(route, fx)
                built = time.perf_counter() - start
                start = time.perf_counter()
                scores[route] = evaluate(lms[route])
                evaluated = time.perf_counter() - start
                if i > 0:
                    build[route].append(built)
                    evals[route].append(evaluated)
        med_eval = {r: C.median(v) for r, v in evals.items()}
        med_build = {r: C.median(v) for r, v in build.items()}
        bare = med_eval["hf_bare"]
        rows = [
            [
                r,
                med_eval[r],
                C.spread(evals[r]),
                f"{100 * (med_eval[r] / bare - 1):+.1f}%",
                med_build[r],
                C.spread(build[r]),
                scores[r],
            ]
            for r in ROUTES
        ]
        C.print_table(
            f"median of {args.reps} runs after 1 warm-up, routes interleaved; evaluation = simple_evaluate on a built "
            f"model, {args.limit} documents ({2 * args.limit} loglikelihood requests), batch 16, fp32 CPU",
            [
                "route",
                "eval median s",
                "eval min-max s",
                "eval vs hf_bare",
                "build median s",
                "build min-max s",
                "acc",
            ],
            rows,
        )
        result.update(
            {
                "n_params": fx["n_params"],
                "eval_median_s": med_eval,
                "eval_all_s": evals,
                "build_median_s": med_build,
                "build_all_s": build,
                "acc": scores,
                "adamergex_eval_vs_bare": med_eval["adamergex"] / bare - 1,
                "unmerged_eval_vs_bare": med_eval["hf_peft_unmerged"] / bare - 1,
                "goal_within_3pct_of_bare": med_eval["adamergex"] / bare - 1 <= GOAL,
            }
        )
        lms.clear()
        if args.cli_reps:
            result["cli"] = run_cli(fx, args, launcher, cli_env)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    C.print_result(result)


def run_cli(fx: dict, args, launcher: list[str], env: dict) -> dict:
    """Whole command lines, ``--cli-reps`` runs per route, interleaved (no warm-up run)."""
    times = {r: [] for r in ROUTES}
    for _ in range(args.cli_reps):
        for route in ROUTES:
            margs = dict(model_args(route, fx))
            batch = margs.pop("batch_size")
            device = margs.pop("device")  # a CLI option of its own (lm-eval passes it to the model)
            model = "adamergex" if route == "adamergex" else "hf"
            cmd = [
                *launcher, "--model", model, "--model_args", ",".join(f"{k}={v}" for k, v in margs.items()),
                "--tasks", "bench_mc", "--include_path", str(fx["tasks"]), "--limit", str(args.limit),
                "--batch_size", str(batch), "--device", device,
            ]  # fmt: skip
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            times[route].append(time.perf_counter() - start)
    med = {r: C.median(v) for r, v in times.items()}
    C.print_table(
        f"whole command line ({' '.join(Path(x).name for x in launcher)} --model ... --tasks bench_mc --limit "
        f"{args.limit}), {args.cli_reps} run(s) per route, interleaved, no warm-up",
        ["route", "median s", "min-max s", "vs hf_bare"],
        [[r, med[r], C.spread(times[r]), f"{100 * (med[r] / med['hf_bare'] - 1):+.1f}%"] for r in ROUTES],
    )
    return {"median_s": med, "all_s": times, "runs_per_route": args.cli_reps}


if __name__ == "__main__":
    main()
