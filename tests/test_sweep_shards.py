"""A sweep's cells split over processes (issue 11.2): per-rank shard files, rank 0 gathers, resume on any rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adamergex_peft import testing
from adamergex_peft.sweep import RESULTS_JSON, SHARDS_DIR, TABLE_CSV, TABLE_MD, plan_points, run_sweep

TASKS = "adamergex_sh_sweeptest_{lang}"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sh_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_shards")
    testing.topic_sweep_models(root, ("task", "ref_src", "ref_sw", "ref_th"), seed=400)
    for lang, objs in {
        "sw": ("apple", "book", "food"),
        "th": ("study", "book", "apple", "food"),
        "en": ("book",),
    }.items():
        rows = testing.topic_rows(objs)
        testing.write_jsonl(rows, root / f"{lang}.jsonl")
        testing.write_task_yaml(
            root / "tasks",
            TASKS.format(lang=lang),
            root / f"{lang}.jsonl",
            doc_to_text="prompt",
            doc_to_choice="choices",
            doc_to_target="label",
            target_delimiter=" ",
        )
    return root


def _targets(root):
    return {"sw": str(root / "ref_sw"), "th": str(root / "ref_th")}


def _run(root, out, **kwargs):
    return run_sweep(
        str(root / "base"),
        str(root / "task"),
        str(root / "ref_src"),
        _targets(root),
        out,
        tasks=[TASKS],
        t_values=[0.0, 1.0],
        methods=("adamergex", "task_only"),
        include_path=str(root / "tasks"),
        batch_size=8,
        progress=False,
        **kwargs,
    )


def _assert_same(a, b, path="") -> None:
    """Equal structure, strings and keys; numbers equal up to float round-off.

    A cell's numbers depend on the cells evaluated before it on the same model only through the
    round-off of merge/undo (about 1e-7 relative in float32), so two processes and one agree to that.
    """
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), path
    else:
        assert a == b, path


def _table(path: Path) -> list[list]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    return [[float(c) if c.replace(".", "", 1).replace("e-", "", 1).isdigit() else c for c in row] for row in rows]


def test_two_ranks_in_process_resume_and_gather(sh_setup, tmp_path):
    """Rank 1 alone first (as if rank 0 had been interrupted), then rank 0: it evaluates only its cells and gathers."""
    root = sh_setup
    single = json.loads(json.dumps(_run(root, tmp_path / "single").to_dict()))
    out = tmp_path / "sharded"
    keys = [p.key for p in plan_points(["adamergex", "task_only"], [0.0, 1.0], ["sw", "th"])]

    seen1 = []
    shard1 = _run(root, out, rank=1, world_size=2, on_point=lambda r: seen1.append(r["key"]))
    assert seen1 == keys[1::2] and [p["key"] for p in shard1.points] == keys[1::2]
    assert (out / SHARDS_DIR / "rank1.json").is_file() and not (out / RESULTS_JSON).exists()
    seen1.clear()
    _run(root, out, rank=1, world_size=2, on_point=lambda r: seen1.append(r["key"]))
    assert seen1 == []  # resumed: its cells are done

    seen0 = []
    gathered = _run(root, out, rank=0, world_size=2, on_point=lambda r: seen0.append(r["key"]))
    assert seen0 == keys[0::2]
    data = json.loads((out / RESULTS_JSON).read_text())
    assert [p["key"] for p in data["points"]] == keys
    _assert_same(data, single)
    assert gathered.to_dict()["best"]["key"] == single["best"]["key"]
    _assert_same(_table(out / TABLE_CSV), _table(tmp_path / "single" / TABLE_CSV))
    # A later run on one process finds everything done (main file and shards).
    seen0.clear()
    _run(root, out, on_point=lambda r: seen0.append(r["key"]))
    assert seen0 == []


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(sh_setup, tmp_path):
    """``torchrun --nproc_per_node 2``: the gathered outputs equal a one-process run's (with a reference task)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    root = sh_setup
    single_dir, out = tmp_path / "single", tmp_path / "torchrun"
    _run(root, single_dir, reference_task=TASKS.format(lang="en"))
    argv = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "adamergex_peft", "sweep"]
    argv += ["--base-model", str(root / "base"), "--task-adapter", str(root / "task")]
    argv += ["--source-reference", str(root / "ref_src"), "--target-reference"]
    argv += [f"{lang}={path}" for lang, path in _targets(root).items()]
    argv += ["--t", "0", "1", "--methods", "adamergex", "task_only", "--tasks", TASKS]
    argv += ["--include-path", str(root / "tasks"), "--batch-size", "8", "--output", str(out), "--no-progress"]
    argv += ["--reference-task", TASKS.format(lang="en")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 1/2]" in proc.stdout and "best [sw]: " in proc.stdout
    data = json.loads((out / RESULTS_JSON).read_text())
    single = json.loads((single_dir / RESULTS_JSON).read_text())
    assert data["reference"]["n"] == 4 and data["reference"]["task"] == TASKS.format(lang="en")
    _assert_same(data, single)
    _assert_same(_table(out / TABLE_CSV), _table(single_dir / TABLE_CSV))
    assert (out / TABLE_MD).is_file()
    shards = sorted(p.name for p in (out / SHARDS_DIR).iterdir())
    assert shards == ["rank0.json", "rank1.json", "reference.json"]
