"""Probe: the bf16 path of the into-base merge, by block size.

``adamergex_peft.model._add_low_rank_`` adds ``alpha * left @ right`` to a non-float32 weight in row
blocks of at most ``_CHUNK_ELEMENTS`` (2**24) elements, each block converted to float32
(``block.float()``), updated with ``torch.addmm`` (a second float32 block) and copied back. This
probe calls that function on one bf16 gate_proj-shaped weight (11008 x 4096) with rank-24 factors,
with the module constant patched to several block sizes (the library file is not changed), and
reports time (median of ``--reps`` after a warm-up) and peak extra RSS (this process, VmHWM reset
before each measurement). The float32 weight (one in-place ``addmm_``) is the reference.

    python benchmarks/probe_base_merge_chunk.py [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BLOCKS = (1 << 24, 1 << 22, 1 << 20, 1 << 18, 1 << 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(parser)
    args = parser.parse_args()
    C.apply_threads(args)

    import torch

    from adamergex_peft import model as lib

    env = C.environment()
    print(f"probe: into-base merge of one 11008 x 4096 weight by block size; {env}")
    gen = torch.Generator().manual_seed(0)
    left = torch.randn(C.INTERMEDIATE, 3 * C.RANK, generator=gen) * 0.01
    right = torch.randn(3 * C.RANK, C.HIDDEN, generator=gen) / C.HIDDEN**0.5
    rows, result = [], {"benchmark": "base_merge_chunk", "reps": args.reps, "env": env, "cases": {}}
    original = lib._CHUNK_ELEMENTS
    try:
        cases = [("fp32", None)] + [("bf16", b) for b in BLOCKS]
        for dtype_name, block in cases:
            weight = (torch.randn(C.INTERMEDIATE, C.HIDDEN, generator=gen) * 0.02).to(C.dtype_of(dtype_name))
            if block is not None:
                lib._CHUNK_ELEMENTS = block
            times = C.time_reps(lambda w=weight: lib._add_low_rank_(w, left, right, 1.0), args.reps)
            with C.PeakRSS() as probe:
                lib._add_low_rank_(weight, left, right, 1.0)
            weight_bytes = weight.numel() * weight.element_size()
            label = "one addmm_ in place" if block is None else f"{block} elements ({block * 4 / 2**20:g} MiB fp32)"
            rows.append(
                [dtype_name, label, C.median(times), C.spread(times), C.mib(probe.extra), probe.extra / weight_bytes]
            )
            result["cases"][f"{dtype_name}|{block}"] = {"s": times, "peak_extra_rss_bytes": probe.extra}
            del weight
            C.trim_heap()
    finally:
        lib._CHUNK_ELEMENTS = original
    C.print_table(
        f"one 11008 x 4096 weight, rank-24 update; median of {args.reps} after 1 warm-up; "
        "x weight = peak extra RSS / the weight's own size",
        ["weight", "block", "median s", "min-max s", "peak extra RSS MiB", "x weight"],
        rows,
    )
    C.print_result(result)


if __name__ == "__main__":
    main()
