"""Benchmark 7: accuracy of the merge arithmetic against a float64 reference, fp32 and bf16 inputs.

For every method/strategy the library offers (and for PEFT's ``cat`` route), the merged result is
compared with the same formula evaluated in float64 on the very same input values (bf16 inputs are
converted to float64 exactly). LoRA results are compared as dense updates ``s * B @ A`` (formed
in float64 from the output factors), one Llama-2-7B layer (q,k,v,o,gate,up,down; r=8, alpha=16);
(IA)^3 results as vectors (k, v, down of 32 layers). Into-base merges are compared as weights
``W + dW`` on one layer with real (random) fp32 or bf16 base weights.

Error = max over modules of ``max|x - ref| / max|ref|`` (max-norm relative error). For ``W + dW`` a
second column divides by ``max|dW|`` instead (how much of the update itself is lost). Unit
round-off: fp32 6.0e-8, bf16 3.9e-3; a result stored in bf16 cannot be better than ~2e-3.

The arithmetic is deterministic, so there are no repetitions here (this is not a timing benchmark).

    python benchmarks/bench_accuracy.py            # t = 0.7 (a fractional t exercises the power rule)
    python benchmarks/bench_accuracy.py --quick    # q and down only, 4 (IA)^3 layers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LORA_CASES = (
    ("adamergex", "exact"),
    ("adamergex", "svd"),
    ("adamergex", "factorwise"),
    ("task_plus_target", "exact"),
    ("task_only", "exact"),
    ("arimerge", "exact"),
    ("cross", "exact"),
)
IA3_CASES = (
    ("adamergex", "linear"),
    ("adamergex", "power"),
    ("task_plus_target", "linear"),
    ("arimerge", "linear"),
    ("cross", "linear"),
)


def rel_err(x, ref) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def lora_reference(method: str, strategy: str, f: dict, t: float):
    """float64 dense update of one module; ``f[role] = (A, B, s)`` in float64."""
    (at, bt, st), (ag, bg, sg), (as_, bs, ss) = f["T"], f["Rg"], f["Rs"]
    if method == "adamergex" and strategy in ("exact", "svd"):
        return st * bt @ at + t * (sg * bg @ ag - ss * bs @ as_)
    if method == "adamergex" and strategy == "factorwise":
        return st * (bt + t * (bg - bs)) @ (at + t * (ag - as_))
    if method == "task_plus_target":
        return st * bt @ at + t * sg * bg @ ag
    if method == "task_only":
        return st * bt @ at
    if method == "arimerge":
        return st * (0.5 * bt + 0.5 * (bg - bs)) @ (0.5 * at + 0.5 * (ag + as_))
    if method == "cross":
        return st * (bt * (t * (bg / bs - 1) + 1)) @ (at * (t * (ag / as_ - 1) + 1))
    raise ValueError((method, strategy))


def ia3_reference(method: str, strategy: str, v: dict, t: float):
    lt, lg, ls = v["T"], v["Rg"], v["Rs"]
    if method == "adamergex":
        return lt * (t * (lg / ls - 1) + 1) if strategy == "linear" else lt * (lg / ls) ** t
    if method == "task_plus_target":
        return lt * (t * (lg - 1) + 1)
    if method == "arimerge":
        return 0.5 + 0.5 * lt + 0.5 * (lg - ls)
    if method == "cross":
        return lt + t * (lg - ls)
    raise ValueError(method)


def lora_part(dtype_name: str, modules, t: float, rows: list, result: dict) -> None:
    from peft.tuners.lora import LoraLayer

    from adamergex_peft.merge import AdapterWeights, merge_state_dicts

    dtype = C.dtype_of(dtype_name)
    sds = {r: C.make_lora_state_dict(1, dtype, s, modules=modules) for r, s in (("T", 1), ("Rs", 2), ("Rg", 3))}
    scaling = C.ALPHA / C.RANK
    keys = [C.module_key(0, m) for m in modules]

    def f64(role, key):
        sd = sds[role]
        return sd[key + ".lora_A.weight"].double(), sd[key + ".lora_B.weight"].double(), scaling

    for method, strategy in LORA_CASES:
        cfg = C.adamergex_config(
            method=method, lora_strategy=strategy, t=t, svd_rank=3 * C.RANK if strategy == "svd" else None
        )
        res = merge_state_dicts(*(AdapterWeights(r, C.lora_config(), sds[r]) for r in ("T", "Rs", "Rg")), cfg)
        s_out = res.peft_config.lora_alpha / res.peft_config.r
        err = 0.0
        for key in keys:
            a = res.state_dict[key + ".lora_A.weight"].double()
            b = res.state_dict[key + ".lora_B.weight"].double()
            ref = lora_reference(method, strategy, {r: f64(r, key) for r in ("T", "Rg", "Rs")}, t)
            err = max(err, rel_err(s_out * b @ a, ref))
        name = f"lora {method}/{strategy}" + (" (svd_rank 24)" if strategy == "svd" else "")
        rows.append(
            [dtype_name, name, str(res.state_dict[keys[0] + ".lora_A.weight"].dtype).replace("torch.", ""), err, "-"]
        )
        result[f"{dtype_name}|{name}"] = err

    # PEFT's cat route on the same adapters (kept in their dtype: autocast_adapter_dtype=False)
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="adamergex-bench7-"))
    try:
        cfg = C.lora_config()
        cfg.target_modules = list(modules)
        dirs = {r: C.write_adapter(root / r, cfg, sds[r]) for r in sds}
        model = C.load_three(C.build_base(1, dtype, materialize=False), dirs, autocast_adapter_dtype=False)
        model.add_weighted_adapter(["task", "ref_tgt", "ref_src"], [1.0, t, -t], "merged", "cat")
        err = 0.0
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and "merged" in module.lora_A:
                key = "base_model.model." + name[len("base_model.model.") :]
                out_dtype = str(module.lora_A["merged"].weight.dtype).replace("torch.", "")
                a = module.lora_A["merged"].weight.double()
                b = module.lora_B["merged"].weight.double()
                ref = lora_reference("adamergex", "exact", {r: f64(r, key) for r in ("T", "Rg", "Rs")}, t)
                err = max(err, rel_err(module.scaling["merged"] * b @ a, ref))
        rows.append(
            [
                dtype_name,
                "lora PEFT add_weighted_adapter cat",
                out_dtype,
                err,
                "-",
            ]
        )
        result[f"{dtype_name}|lora PEFT cat"] = err
        into_base(dtype_name, dirs, sds, modules, t, rows, result, f64)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def into_base(dtype_name, dirs, sds, modules, t, rows, result, f64) -> None:
    """``W + dW`` of ours and of PEFT cat + merge_and_unload, on one layer with real base weights."""
    import torch

    from adamergex_peft import merge_crosslingual_into_base

    dtype = C.dtype_of(dtype_name)
    base = C.build_base(1, dtype, materialize=True)
    weights0 = {
        n: p.detach().double().clone()
        for n, p in base.named_parameters()
        if any(n.endswith(C.LORA_MODULES[m][0] + ".weight") for m in modules)
    }
    for route in ("ours", "peft"):
        model = C.load_three(base, dirs, autocast_adapter_dtype=False)
        if route == "ours":
            merge_crosslingual_into_base(model, C.adamergex_config(t=t))
            merged = model.unload()
        else:
            model.add_weighted_adapter(["task", "ref_tgt", "ref_src"], [1.0, t, -t], "merged", "cat")
            merged = model.merge_and_unload(adapter_names=["merged"])
        err_w = err_dw = 0.0
        params = dict(merged.named_parameters())
        for n, w0 in weights0.items():
            key = "base_model.model." + n[: -len(".weight")]
            dw = lora_reference("adamergex", "exact", {r: f64(r, key) for r in ("T", "Rg", "Rs")}, t)
            diff = (params[n].detach().double() - (w0 + dw)).abs().max()
            err_w = max(err_w, float(diff / (w0 + dw).abs().max()))
            err_dw = max(err_dw, float(diff / dw.abs().max()))
        with torch.no_grad():  # restore the base for the next route
            for n, w0 in weights0.items():
                params[n].copy_(w0.to(dtype))
        base = merged
        label = (
            "into base: ours merge_crosslingual_into_base"
            if route == "ours"
            else "into base: PEFT cat + merge_and_unload"
        )
        rows.append([dtype_name, label, f"W {dtype}".replace("torch.", ""), err_w, err_dw])
        result[f"{dtype_name}|{label}"] = {"rel_to_W": err_w, "rel_to_dW": err_dw}


def ia3_part(dtype_name: str, n_layers: int, t: float, rows: list, result: dict) -> None:
    from adamergex_peft.merge import AdapterWeights, merge_state_dicts

    dtype = C.dtype_of(dtype_name)
    sds = {r: C.make_ia3_state_dict(n_layers, dtype, s) for r, s in (("T", 1), ("Rs", 2), ("Rg", 3))}
    for method, strategy in IA3_CASES:
        cfg = C.adamergex_config(method=method, ia3_strategy=strategy, t=t)
        res = merge_state_dicts(*(AdapterWeights(r, C.ia3_config(), sds[r]) for r in ("T", "Rs", "Rg")), cfg)
        err = max(
            rel_err(
                res.state_dict[k].double(), ia3_reference(method, strategy, {r: sds[r][k].double() for r in sds}, t)
            )
            for k in sds["T"]
        )
        name = f"ia3 {method}/{strategy}"
        rows.append([dtype_name, name, str(next(iter(res.state_dict.values())).dtype).replace("torch.", ""), err, "-"])
        result[f"{dtype_name}|{name}"] = err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="q_proj and down_proj only; 4 (IA)^3 layers")
    parser.add_argument("--t", type=float, default=0.7)
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    modules = ("q_proj", "down_proj") if args.quick else tuple(C.LORA_MODULES)
    env = C.environment()
    print(f"benchmark 7: arithmetic accuracy vs float64; t={args.t}; LoRA modules {modules}; {env}")
    rows: list = []
    errors: dict = {}
    for dtype_name in args.dtypes.split(","):
        lora_part(dtype_name, modules, args.t, rows, errors)
        ia3_part(dtype_name, 4 if args.quick else C.N_LAYERS_7B, args.t, rows, errors)
    C.print_table(
        "max-norm relative error vs the same formula in float64 (max over modules of max|x - ref| / max|ref|)",
        ["input dtype", "strategy", "output dtype", "rel. error", "err / max|dW|"],
        rows,
    )
    C.print_result({"benchmark": "accuracy", "t": args.t, "modules": list(modules), "env": env, "errors": errors})


if __name__ == "__main__":
    main()
