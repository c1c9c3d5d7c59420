"""Shared helpers for the benchmarks: Llama-2-7B-shaped adapters, timing, peak-memory probes, tables.

Not part of the library. Every benchmark script imports this module as ``_common`` (the scripts add
their own folder to ``sys.path``), so run them as ``python benchmarks/<name>.py`` from the repo root.

Memory is measured as resident set size (RSS) of a fresh child process: the child sets up, runs the
operation once as a warm-up, frees it, trims the heap (``malloc_trim``), resets the kernel's peak-RSS
counter (``/proc/self/clear_refs`` = 5), records the current RSS, runs the operation once more and
reads the peak (``VmHWM``). ``peak extra = VmHWM - RSS before``. tracemalloc would miss torch's
allocations, hence RSS. Memory that was allocated but never written (``torch.empty``) is not resident,
which is how a Llama-2-7B-shaped base can be built for merges that never read the base weights.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

HIDDEN = 4096
INTERMEDIATE = 11008
N_LAYERS_7B = 32
RANK = 8
ALPHA = 16
# module -> (path inside a decoder layer, out_features, in_features)
LORA_MODULES: dict[str, tuple[str, int, int]] = {
    "q_proj": ("self_attn.q_proj", HIDDEN, HIDDEN),
    "k_proj": ("self_attn.k_proj", HIDDEN, HIDDEN),
    "v_proj": ("self_attn.v_proj", HIDDEN, HIDDEN),
    "o_proj": ("self_attn.o_proj", HIDDEN, HIDDEN),
    "gate_proj": ("mlp.gate_proj", INTERMEDIATE, HIDDEN),
    "up_proj": ("mlp.up_proj", INTERMEDIATE, HIDDEN),
    "down_proj": ("mlp.down_proj", HIDDEN, INTERMEDIATE),
}
IA3_MODULES = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)
ROOT = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 deprecation noise


# ------------------------------------------------------------------------------------ environment
def environment() -> dict:
    """Versions, core count and load average, to print with every table."""
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "cuda": torch.cuda.is_available(),
    }


def dtype_of(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# ------------------------------------------------------------------------------------- adapters
def module_key(layer: int, module: str) -> str:
    """PEFT's saved key prefix of one module of a Llama model."""
    return f"base_model.model.model.layers.{layer}.{LORA_MODULES[module][0]}"


def make_lora_state_dict(n_layers: int, dtype, seed: int, rank: int = RANK, modules=tuple(LORA_MODULES)) -> dict:
    """Random LoRA factors in PEFT's saved format (A ~ N(0, 1/in), B ~ N(0, 0.01^2): B is not zero,
    as after training)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(n_layers):
        for module in modules:
            _, fan_out, fan_in = LORA_MODULES[module]
            key = module_key(layer, module)
            out[key + ".lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) / fan_in**0.5).to(dtype)
            out[key + ".lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01).to(dtype)
    return out


def make_ia3_state_dict(n_layers: int, dtype, seed: int, spread: float = 0.05) -> dict:
    """Random (IA)^3 vectors ``1 + spread * N(0, 1)`` on k, v (``(out, 1)``) and down (``(1, in)``)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(n_layers):
        for module in IA3_MODULES:
            _, fan_out, fan_in = LORA_MODULES[module]
            shape = (1, fan_in) if module in IA3_FEEDFORWARD else (fan_out, 1)
            out[module_key(layer, module) + ".ia3_l"] = (1.0 + spread * torch.randn(*shape, generator=gen)).to(dtype)
    return out


def lora_config(rank: int = RANK, alpha: int = ALPHA):
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.05, target_modules=list(LORA_MODULES), task_type="CAUSAL_LM"
    )


def ia3_config():
    from peft import IA3Config

    return IA3Config(
        target_modules=list(IA3_MODULES), feedforward_modules=list(IA3_FEEDFORWARD), task_type="CAUSAL_LM"
    )


def write_adapter(folder: Path, config, state_dict: dict) -> Path:
    """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(state_dict, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def nbytes(state_dict: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


# ------------------------------------------------------------------------------------- base model
def llama_config(n_layers: int, vocab_size: int = 256):
    """Llama-2-7B's decoder-layer shapes with ``n_layers`` layers and a small vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=n_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
    )


def build_base(n_layers: int, dtype, materialize: bool):
    """A LlamaForCausalLM with Llama-2-7B layer shapes.

    ``materialize=False``: weights allocated with ``to_empty`` and never written, so they take no
    resident memory (for merges that never read the base weights; a 32-layer fp32 model is 27 GB
    of address space but ~0 RSS). ``materialize=True``: weights written with small random values.
    """
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(n_layers)).to(dtype)
    model = model.to_empty(device="cpu")
    if materialize:
        gen = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.02, generator=gen)
    model.eval()
    return model


def load_three(model, dirs: dict[str, Path], low_cpu_mem_usage: bool = False, autocast_adapter_dtype: bool = True):
    """``PeftModel`` with adapters ``task``, ``ref_src``, ``ref_tgt`` loaded from ``dirs['T'|'Rs'|'Rg']``.

    PEFT's default ``autocast_adapter_dtype=True`` turns bf16/fp16 adapter weights into fp32 on load;
    pass ``False`` to keep them in the file's dtype.
    """
    from peft import PeftModel

    kwargs = {"low_cpu_mem_usage": low_cpu_mem_usage, "autocast_adapter_dtype": autocast_adapter_dtype}
    peft_model = PeftModel.from_pretrained(model, str(dirs["T"]), adapter_name="task", **kwargs)
    peft_model.load_adapter(str(dirs["Rs"]), adapter_name="ref_src", **kwargs)
    peft_model.load_adapter(str(dirs["Rg"]), adapter_name="ref_tgt", **kwargs)
    return peft_model


def adamergex_config(**kwargs):
    from adamergex_peft import AdaMergeXConfig

    base = {"task_adapter": "task", "source_reference_adapter": "ref_src", "target_reference_adapter": "ref_tgt"}
    base.update(kwargs)
    return AdaMergeXConfig(**base)


# ------------------------------------------------------------------------------------------ timing
def time_reps(fn: Callable[[], object], reps: int, warmup: int = 1, setup: Callable[[], object] | None = None):
    """Run ``setup`` (untimed) then ``fn`` (timed), ``warmup`` + ``reps`` times; return the ``reps`` times."""
    times = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        gc.collect()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def spread(xs) -> str:
    return f"{min(xs):.3f}-{max(xs):.3f}"


# ------------------------------------------------------------------------------------------ memory
def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Peak extra resident memory of a block of code (this process; Linux only).

    ``with PeakRSS() as probe: ...`` then ``probe.extra`` (bytes above the RSS at entry).
    """

    def __enter__(self):
        import torch

        trim_heap()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        self.before = _status("VmRSS")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        import torch

        self.peak = _status("VmHWM")
        self.extra = max(0, self.peak - self.before)
        self.cuda_extra = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_extra = torch.cuda.max_memory_allocated() - self.cuda_before
        return False


def run_child(script: Path, args: list[str], timeout: float = 600) -> dict:
    """Run ``python script --child ... args`` and return the JSON it prints on a ``CHILD {...}`` line."""
    if THREADS:
        args = [*args, "--threads", str(THREADS)]
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("CHILD "):
            return json.loads(line[len("CHILD ") :])
    raise RuntimeError(f"child {args} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def child_print(payload: dict) -> None:
    print("CHILD " + json.dumps(payload), flush=True)


# ------------------------------------------------------------------------------------------ output
def mib(n: float) -> float:
    return n / 2**20


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def _fmt(x) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        if abs(x) >= 1e-3:
            return f"{x:.4f}"
        return f"{x:.2e}"
    return str(x)


def print_result(payload: dict) -> None:
    print("RESULT " + json.dumps(payload, sort_keys=True), flush=True)


def add_common_args(parser, reps: int = 5) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller size (for a smoke run)")
    parser.add_argument("--reps", type=int, default=reps, help=f"timed repetitions after one warm-up (default {reps})")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads here and in child processes (default: torch's default, one per core)",
    )
    parser.add_argument("--child", default=None, help=argparse_suppress())


#: Thread count given with --threads, passed on to child processes and CLI subprocesses.
THREADS: int | None = None


def apply_threads(args) -> None:
    """Apply ``--threads`` (torch.set_num_threads) and remember it for child processes."""
    global THREADS
    THREADS = getattr(args, "threads", None)
    if THREADS:
        import torch

        torch.set_num_threads(THREADS)
        os.environ["OMP_NUM_THREADS"] = str(THREADS)  # inherited by subprocesses (CLI runs)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


# -------------------------------------------------------------------------- lm-eval fixtures (5, 6)
EVAL_WORDS = (
    "the cat sat on mat because it was warm a dog runs in park and man walks question what is two plus "
    "answer four premise fell cause he slipped ice paka alikaa kwenye mkeka kwa sababu ulikuwa na joto mbwa "
    "anakimbia bustani mtu anatembea"
).split()


def build_eval_fixture(root: Path, n_docs: int = 200, hidden: int = 512, layers: int = 8) -> dict[str, Path]:
    """A random Llama (~30M parameters with the defaults) + local BPE tokenizer, three LoRA adapters
    (r=8, alpha=16, q,k,v,o,gate,up,down, random non-zero B), the AdaMergeX-merged adapter (t=1, exact)
    and a local multiple-choice task ``bench_mc`` (``n_docs`` documents, metric acc). Offline."""
    import random

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from adamergex_peft import merge_adapter_files, testing

    root = Path(root)
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(EVAL_WORDS) for _ in range(rng.randint(4, 12))) for _ in range(400)]
    tokenizer = testing.bpe_tokenizer(sentences, vocab_size=512)
    model = testing.tiny_llama(
        tokenizer=tokenizer,
        hidden=hidden,
        layers=layers,
        heads=8,
        kv_heads=None,
        intermediate=3 * hidden,
        max_positions=512,
    )
    n_params = sum(p.numel() for p in model.parameters())
    base = testing.save_model(model, tokenizer, root / "base")

    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LORA_MODULES), task_type="CAUSAL_LM")
    dirs = {}
    for role, seed in (("T", 1), ("Rs", 2), ("Rg", 3)):
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base), lora)
        testing.randomize_(peft_model, "default", seed, std=0.02, only="lora_B")  # B is zero after PEFT's init
        dirs[role] = root / f"adapter_{role}"
        peft_model.save_pretrained(dirs[role])
    merged = merge_adapter_files(dirs["T"], dirs["Rs"], dirs["Rg"], root / "merged")

    tasks = root / "tasks"
    docs = []
    for _ in range(n_docs):
        premise, a, b = (" ".join(rng.choice(EVAL_WORDS) for _ in range(rng.randint(n, n + 4))) for n in (6, 2, 2))
        docs.append({"premise": premise, "choice1": a, "choice2": b, "label": rng.randint(0, 1)})
    testing.write_jsonl(docs, tasks / "mc.jsonl")
    testing.write_task_yaml(
        tasks,
        "bench_mc",
        tasks / "mc.jsonl",
        doc_to_text="{{premise}} because",
        doc_to_choice="{{[choice1, choice2]}}",
        doc_to_target="label",
    )
    return {"base": base, **dirs, "merged": merged, "tasks": tasks, "n_params": n_params}


def plugin_launcher() -> tuple[list[str], dict[str, str]]:
    """Command prefix running lm-eval's CLI with ``--model adamergex`` registered, and its environment.

    ``lm_eval`` itself when the plugin is installed (its start-up hook registers the model), else the
    plugin's documented fallback ``python -m adamergex_lm_eval`` with ``plugins/`` on ``PYTHONPATH``.
    """
    import importlib.util

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if importlib.util.find_spec("adamergex_lm_eval") is None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "plugins"), env.get("PYTHONPATH")]))
    return [sys.executable, "-m", "adamergex_lm_eval"], env
