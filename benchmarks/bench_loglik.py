"""Benchmark 8: log-likelihood scoring, ``--model hf`` (HFLM) vs ``SelectiveLogitsHFLM`` (logits at the
scored positions only), same requests, same model, large vocabulary.

Fixture (built offline, no download): a random Llama (hidden 256, 4 layers, intermediate 688,
vocabulary 128,256 as Llama 3; ~69M parameters, 95% of them the embedding and the output head)
and a word-level tokenizer of the same size. Requests: a multiple-choice workload, ``--docs``
documents, each a context of 20-60 tokens and 2-4 choices of 1-6 tokens (lm-eval ``loglikelihood``
instances, as a ``multiple_choice`` task sends them).

Routes: ``hf`` = ``HFLM(pretrained=model)``; ``selective`` =
``adamergex_lm_eval.selective_logits.SelectiveLogitsHFLM(pretrained=model)``; same tokenizer, device,
dtype and batch size. Measured per batch size: time of ``lm.loglikelihood(requests)`` (median of
``--reps`` after one warm-up, the two routes interleaved in every repetition, so the load of other
processes on a shared machine hits both alike), the peak extra resident memory of one call (RSS,
``_common.PeakRSS``; CUDA peak too when ``--device cuda``), and equality of the scores: max
|difference| of the log-likelihoods, greedy flags, ``acc`` and ``acc_norm`` (per-document argmax of
the log-likelihood, raw and divided by the choice's length in characters, as lm-eval computes them).

Second table (``--route adamergex``, or ``--route all``, the default): the real model classes end to
end, as ``lm_eval --model hf`` and ``lm_eval --model adamergex`` run them. The same 128k-vocabulary
base is saved to disk with three LoRA adapters (r=8, alpha=16, all 7 projections, random non-zero B;
built locally as in ``bench_eval.py``) and a local two-to-four-choice task ``bench_mc_big`` (metrics
``acc`` and ``acc_norm``). ``adamergex`` = ``AdaMergeXLM(pretrained=base, task_adapter=T,
source_reference_adapter=Rs, target_reference_adapter=Rg, t=0, merge_into_base=true)``; ``hf`` =
``HFLM(pretrained=base+T)``, the base with the task adapter merged by PEFT's ``merge_and_unload`` and
saved (what AdaMergeX at t=0 is: the task adapter as is). Measured: ``lm_eval.simple_evaluate`` on
the already-built model (median of ``--reps`` after a warm-up, the routes interleaved), model
construction, peak extra RSS of one evaluation, ``acc`` and ``acc_norm`` of both.

Goal (issue 11): at least 5x less time on CPU with equal scores.

    python benchmarks/bench_loglik.py                          # 150 documents, batch 1 and 16, 3 reps
    nice -n 10 python benchmarks/bench_loglik.py --quick --threads 1   # 40 documents, batch 8, 1 rep
    python benchmarks/bench_loglik.py --route adamergex        # only the lm_eval model classes
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

GOAL = 5.0
ROUTES = ("hf", "selective")


def build_fixture(vocab: int, hidden: int, layers: int, seed: int = 0):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer


def build_requests(n_docs: int, vocab: int, seed: int = 0):
    """(instances, docs): ``docs[i] = (first request index, n choices, label, choice strings)``."""
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)

    def words(k):
        return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(k))

    instances, docs = [], []
    for _ in range(n_docs):
        context = words(rng.randint(20, 60))
        choices = [words(rng.randint(1, 6)) for _ in range(rng.randint(2, 4))]
        docs.append((len(instances), len(choices), rng.randrange(len(choices)), choices))
        for c in choices:
            instances.append(
                Instance(request_type="loglikelihood", doc={}, arguments=(context, " " + c), idx=len(instances))
            )
    return instances, docs


def accuracies(results, docs) -> tuple[float, float]:
    """lm-eval's ``acc`` and ``acc_norm`` (log-likelihood / length of the continuation in characters)."""
    acc = acc_norm = 0
    for start, n, label, choices in docs:
        lls = [results[start + j][0] for j in range(n)]
        norm = [ll / len(" " + c) for ll, c in zip(lls, choices)]
        acc += max(range(n), key=lls.__getitem__) == label
        acc_norm += max(range(n), key=norm.__getitem__) == label
    return acc / len(docs), acc_norm / len(docs)


def quiet() -> None:
    for name in ("lm_eval", "lm-eval", "transformers", "accelerate", "peft", "datasets", "adamergex_peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_disk_fixture(root: Path, model, tokenizer, n_docs: int, vocab: int) -> dict:
    """Save the base, three LoRA adapters, the base with the task adapter merged (t=0's model) and
    a local multiple-choice task with ``acc`` and ``acc_norm``."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    from adamergex_peft import testing

    tokenizer.pad_token = tokenizer.eos_token
    base = testing.save_model(model, tokenizer, root / "base")
    lora = LoraConfig(r=C.RANK, lora_alpha=C.ALPHA, target_modules=list(C.LORA_MODULES), task_type="CAUSAL_LM")
    dirs = {}
    for role, seed in (("T", 1), ("Rs", 2), ("Rg", 3)):
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base), lora)
        testing.randomize_(peft_model, "default", seed, std=0.05, only="lora_B")  # B is zero after PEFT's init
        dirs[role] = root / f"adapter_{role}"
        peft_model.save_pretrained(dirs[role])
        del peft_model
    with torch.no_grad():
        merged_t = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), dirs["T"]).merge_and_unload()
    base_t = testing.save_model(merged_t, tokenizer, root / "base_plus_T")
    del merged_t

    rng = random.Random(1)

    def words(k):
        return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(k))

    docs = []
    for _ in range(n_docs):
        n = rng.randint(2, 4)
        docs.append(
            {
                "context": words(rng.randint(20, 60)),
                "choices": [words(rng.randint(1, 6)) for _ in range(n)],
                "label": rng.randrange(n),
            }
        )
    tasks = root / "tasks"
    testing.write_jsonl(docs, tasks / "mc.jsonl")
    testing.write_task_yaml(
        tasks,
        "bench_mc_big",
        tasks / "mc.jsonl",
        doc_to_text="{{context}}",
        doc_to_choice="{{choices}}",
        doc_to_target="label",
        metrics=("acc", "acc_norm"),
    )
    return {"base": base, "base_t": base_t, **dirs, "tasks": tasks}


def run_adamergex_table(args, model, tokenizer, env: dict) -> dict:
    """Table 2: ``--model hf`` (base + T) vs ``--model adamergex`` (t=0), lm-eval's own classes."""
    import lm_eval
    from adamergex_lm_eval.model import AdaMergeXLM
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    routes = ("hf", "adamergex")
    batch_size = int((args.batch_sizes or ("8" if args.quick else "16")).split(",")[-1])
    root = Path(tempfile.mkdtemp(prefix="adamergex-bench8-"))
    try:
        fx = build_disk_fixture(root, model, tokenizer, args.docs, args.vocab)
        tm = TaskManager(include_path=str(fx["tasks"]), include_defaults=False)
        common = {"batch_size": batch_size, "device": args.device, "dtype": "float32"}

        def build(route):
            if route == "hf":
                return HFLM(pretrained=str(fx["base_t"]), **common)
            return AdaMergeXLM(
                pretrained=str(fx["base"]),
                task_adapter=str(fx["T"]),
                source_reference_adapter=str(fx["Rs"]),
                target_reference_adapter=str(fx["Rg"]),
                t=0.0,
                merge_into_base=True,
                **common,
            )

        loglik_s = {"last": 0.0}

        def timed(method):
            def wrapper(requests, *a, **k):
                start = time.perf_counter()
                try:
                    return method(requests, *a, **k)
                finally:
                    loglik_s["last"] += time.perf_counter() - start

            return wrapper

        def evaluate(lm):
            if "loglikelihood" not in vars(lm):  # time lm.loglikelihood inside simple_evaluate
                lm.loglikelihood = timed(lm.loglikelihood)
            loglik_s["last"] = 0.0
            out = lm_eval.simple_evaluate(
                model=lm, tasks=["bench_mc_big"], task_manager=tm, log_samples=False, bootstrap_iters=0
            )
            res = out["results"]["bench_mc_big"]
            return res["acc,none"], res["acc_norm,none"]

        lms, build_s, scores, memory = {}, {}, {}, {}
        for route in routes:
            C.trim_heap()
            start = time.perf_counter()
            lms[route] = build(route)
            build_s[route] = time.perf_counter() - start
            scores[route] = evaluate(lms[route])  # warm-up
        for route in routes:
            with C.PeakRSS() as probe:
                evaluate(lms[route])
            memory[route] = probe.extra
        times = {r: [] for r in routes}
        ll_times = {r: [] for r in routes}
        for _ in range(args.reps):
            for route in routes:
                start = time.perf_counter()
                got = evaluate(lms[route])
                times[route].append(time.perf_counter() - start)
                ll_times[route].append(loglik_s["last"])
                assert got == scores[route], (route, got, scores[route])
        mode = getattr(lms["adamergex"], "selective_mode", None)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t_hf, t_ax = C.median(times["hf"]), C.median(times["adamergex"])
    ll_hf, ll_ax = C.median(ll_times["hf"]), C.median(ll_times["adamergex"])
    ratio = t_hf / t_ax
    equal = scores["hf"] == scores["adamergex"]
    C.print_table(
        f"lm_eval.simple_evaluate(bench_mc_big, {args.docs} documents), batch {batch_size}: "
        f"--model hf (base + T merged) vs --model adamergex (t=0, merge_into_base); median of {args.reps}",
        [
            "route",
            "eval s",
            "min-max s",
            "hf / route",
            "loglikelihood s",
            "hf / route",
            "build s",
            "peak extra RSS MiB",
            "acc",
            "acc_norm",
        ],
        [
            [
                r,
                C.median(times[r]),
                C.spread(times[r]),
                t_hf / C.median(times[r]),
                C.median(ll_times[r]),
                ll_hf / C.median(ll_times[r]),
                build_s[r],
                C.mib(memory[r]),
                scores[r][0],
                scores[r][1],
            ]
            for r in routes
        ],
    )
    print(
        f"adamergex: {ll_hf / ll_ax:.2f}x less time in lm.loglikelihood, {ratio:.2f}x less for the whole "
        f"simple_evaluate (task loading, tokenisation and metrics included) than hf (goal {GOAL:g}x: {'met' if ratio >= GOAL else 'MISSED'}); "
        f"scores equal: {equal}; selective mode {mode}"
    )
    return {
        "batch_size": batch_size,
        "times_hf_s": times["hf"],
        "times_adamergex_s": times["adamergex"],
        "time_hf_s": t_hf,
        "time_adamergex_s": t_ax,
        "time_ratio": ratio,
        "loglik_times_hf_s": ll_times["hf"],
        "loglik_times_adamergex_s": ll_times["adamergex"],
        "loglik_time_ratio": ll_hf / ll_ax,
        "goal_met": ratio >= GOAL and equal,  # the whole simple_evaluate
        "goal_met_loglikelihood": ll_hf / ll_ax >= GOAL and equal,
        "build_hf_s": build_s["hf"],
        "build_adamergex_s": build_s["adamergex"],
        "peak_extra_rss_hf_mib": C.mib(memory["hf"]),
        "peak_extra_rss_adamergex_mib": C.mib(memory["adamergex"]),
        "acc_hf": scores["hf"][0],
        "acc_adamergex": scores["adamergex"][0],
        "acc_norm_hf": scores["hf"][1],
        "acc_norm_adamergex": scores["adamergex"][1],
        "scores_equal": equal,
        "selective_mode": mode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser, reps=3)
    parser.add_argument("--docs", type=int, default=None, help="documents (default 150; --quick: 40)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,16; --quick: 8)")
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--route",
        choices=("selective", "adamergex", "all"),
        default="all",
        help="selective: HFLM vs SelectiveLogitsHFLM on raw requests; adamergex: lm_eval --model hf vs "
        "--model adamergex (t=0) on a local task; all: both tables",
    )
    args = parser.parse_args()
    if args.quick:
        args.reps = min(args.reps, 1)
    C.apply_threads(args)
    args.docs = args.docs or (40 if args.quick else 150)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("8" if args.quick else "1,16")).split(",")]

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, str(C.ROOT / "plugins"))  # the plugin package, when not installed
    quiet()
    from adamergex_lm_eval.selective_logits import SelectiveLogitsHFLM
    from lm_eval.models.huggingface import HFLM

    env = C.environment()
    model, tokenizer = build_fixture(args.vocab, args.hidden, args.layers)
    model = model.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    requests, docs = build_requests(args.docs, args.vocab)
    n_tokens = sum(len(tokenizer(" ".join(r.arguments)).input_ids) for r in requests)
    print(
        f"benchmark 8: log-likelihoods, HFLM vs SelectiveLogitsHFLM; random Llama {n_params / 1e6:.1f}M params, "
        f"vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers; {args.docs} documents, "
        f"{len(requests)} requests, ~{n_tokens / len(requests):.0f} tokens each; {env}"
    )
    result = {
        "benchmark": "loglik",
        "docs": args.docs,
        "requests": len(requests),
        "vocab": args.vocab,
        "hidden": args.hidden,
        "layers": args.layers,
        "params": n_params,
        "device": args.device,
        "reps": args.reps,
        "env": env,
        "goal_time_ratio": GOAL,
        "batch_sizes": {},
    }
    classes = {"hf": HFLM, "selective": SelectiveLogitsHFLM}
    time_rows, score_rows = [], []
    for batch_size in batch_sizes if args.route != "adamergex" else []:
        lms = {
            r: classes[r](pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=args.device)
            for r in ROUTES
        }
        outputs, times, memory, cuda_memory = {}, {r: [] for r in ROUTES}, {}, {}
        for route in ROUTES:  # warm-up (and the selective route's one-time probe of the model)
            lms[route].loglikelihood(requests, disable_tqdm=True)
        for route in ROUTES:  # peak memory of one call, and the scores
            with C.PeakRSS() as probe:
                outputs[route] = lms[route].loglikelihood(requests, disable_tqdm=True)
            memory[route], cuda_memory[route] = probe.extra, probe.cuda_extra
        for _ in range(args.reps):  # timed, the routes interleaved
            for route in ROUTES:
                score = lms[route].loglikelihood
                times[route] += C.time_reps(lambda f=score: f(requests, disable_tqdm=True), reps=1, warmup=0)
        hf, sel = outputs["hf"], outputs["selective"]
        max_diff = max(abs(a - b) for (a, _), (b, _) in zip(hf, sel))
        max_rel = max(abs(a - b) / max(1.0, abs(a)) for (a, _), (b, _) in zip(hf, sel))
        flags_equal = [g for _, g in hf] == [g for _, g in sel]
        acc_hf, acc_sel = accuracies(hf, docs), accuracies(sel, docs)
        t_hf, t_sel = C.median(times["hf"]), C.median(times["selective"])
        ratio = t_hf / t_sel
        time_rows.append(
            [
                batch_size,
                t_hf,
                t_sel,
                ratio,
                C.mib(memory["hf"]),
                C.mib(memory["selective"]),
                "yes" if ratio >= GOAL else "NO",
            ]
        )
        score_rows.append([batch_size, acc_hf[0], acc_sel[0], acc_hf[1], acc_sel[1], max_diff, max_rel, flags_equal])
        result["batch_sizes"][str(batch_size)] = {
            "time_hf_s": t_hf,
            "time_selective_s": t_sel,
            "times_hf_s": times["hf"],
            "times_selective_s": times["selective"],
            "time_ratio": ratio,
            "goal_met": ratio >= GOAL,
            "peak_extra_rss_hf_mib": C.mib(memory["hf"]),
            "peak_extra_rss_selective_mib": C.mib(memory["selective"]),
            "peak_cuda_hf_mib": None if cuda_memory["hf"] is None else C.mib(cuda_memory["hf"]),
            "peak_cuda_selective_mib": None if cuda_memory["selective"] is None else C.mib(cuda_memory["selective"]),
            "selective_mode": lms["selective"].selective_mode,
            "acc_hf": acc_hf[0],
            "acc_selective": acc_sel[0],
            "acc_norm_hf": acc_hf[1],
            "acc_norm_selective": acc_sel[1],
            "max_abs_loglik_diff": max_diff,
            "max_rel_loglik_diff": max_rel,
            "greedy_flags_equal": flags_equal,
            "scores_equal": flags_equal and acc_hf == acc_sel and max_rel <= 1e-5,
        }
    if args.route != "adamergex":
        print_selective_tables(args, requests, time_rows, score_rows)
    if args.route != "selective":
        result["adamergex_vs_hf"] = run_adamergex_table(args, model, tokenizer, env)
    C.print_result(result)


def print_selective_tables(args, requests, time_rows, score_rows) -> None:
    C.print_table(
        f"time of lm.loglikelihood({len(requests)} requests), median of {args.reps}; peak extra RSS of one call",
        ["batch", "hf s", "selective s", "hf / selective", "hf MiB", "selective MiB", f">= {GOAL:g}x"],
        time_rows,
    )
    C.print_table(
        "scores",
        ["batch", "acc hf", "acc sel", "acc_norm hf", "acc_norm sel", "max |d loglik|", "max rel d", "greedy equal"],
        score_rows,
    )


if __name__ == "__main__":
    main()
