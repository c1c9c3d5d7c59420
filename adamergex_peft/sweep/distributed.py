"""Several processes: rank detection, the per-rank shard files, the shared reference, gathering on rank 0."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from adamergex_peft.atomic import atomic_write_text
from adamergex_peft.sweep.results import SweepResults

logger = logging.getLogger(__name__)

SHARDS_DIR = ".shards"
REFERENCE_JSON = "reference.json"


def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (torchrun,
    ``accelerate launch``); ``(0, 1, 0)`` when not launched so."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(f"bad RANK/WORLD_SIZE/LOCAL_RANK environment: {err}") from None
    return rank, world, local


def rank_device(device: str | None, local_rank: int) -> str | None:
    """Each rank's own accelerator: ``cuda:LOCAL_RANK`` for ``None`` (when CUDA is there) or ``"cuda"``."""
    import torch

    if device is None and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    if device == "cuda":
        return f"cuda:{local_rank}"
    return device


def shared_reference(output_dir: Path, rank: int, world: int, poll_interval: float, compute) -> dict[str, Any]:
    """The reference distribution: computed on rank 0 (written to the shards folder), read by the others."""
    path = output_dir / SHARDS_DIR / REFERENCE_JSON
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    if rank == 0:
        reference = compute()
        if world > 1:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(reference) + "\n")
        return reference
    logger.info("rank %d: waiting for rank 0's reference distribution (%s)", rank, path)
    while not path.is_file():
        time.sleep(poll_interval)
    return json.loads(path.read_text(encoding="utf-8"))


def barrier() -> None:
    """A ``torch.distributed`` barrier when a process group is initialised (else nothing)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _load_shards(output_dir: Path, settings: dict[str, Any]) -> list[SweepResults]:
    shards = []
    for path in sorted((output_dir / SHARDS_DIR).glob("rank*.json")):
        shard = SweepResults.load(path)
        if shard.settings != settings:
            raise ValueError(
                f"{path} holds a sweep with other settings: use another --output folder, or delete it to start over"
            )
        shards.append(shard)
    return shards


def gather_results(output_dir, settings, main: SweepResults, points, select, rule) -> SweepResults:
    """``main``'s points, then the shard files' points not in it (in plan order): one record."""
    shards = _load_shards(output_dir, settings)
    merged = SweepResults(
        settings=settings, points=list(main.points), reference=main.reference, select=select, label_free_rule=rule
    )
    order = {p.key: i for i, p in enumerate(points)}
    extra: dict[str, dict[str, Any]] = {}
    done = merged.done()
    for shard in shards:
        merged.reference = merged.reference or shard.reference
        for p in shard.points:
            if p["key"] not in done:
                extra.setdefault(p["key"], p)
    merged.points += sorted(extra.values(), key=lambda p: order.get(p["key"], len(order)))
    reference_path = output_dir / SHARDS_DIR / REFERENCE_JSON
    if merged.reference is None and reference_path.is_file():
        merged.reference = json.loads(reference_path.read_text(encoding="utf-8"))
    return merged


def wait_and_gather(output_dir, settings, main, points, select, rule, poll_interval) -> SweepResults:
    """Rank 0: wait until every planned cell is in some shard file, then write the gathered outputs."""
    last_log = 0.0
    while True:
        merged = gather_results(output_dir, settings, main, points, select, rule)
        missing = [p.key for p in points if p.key not in merged.done()]
        if not missing:
            break
        if time.monotonic() - last_log > 60:
            logger.info("rank 0: waiting for %d cells of the other ranks (%s, ...)", len(missing), missing[0])
            last_log = time.monotonic()
        time.sleep(poll_interval)
    merged.save(output_dir)
    return merged
