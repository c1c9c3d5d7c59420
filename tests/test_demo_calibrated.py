"""The demo's table reports the accuracy after label-free calibration beside the raw accuracy."""

from __future__ import annotations

from adamergex_peft.demo.report import format_table
from adamergex_peft.demo.results import DemoResult, table_rows


def _result() -> DemoResult:
    raw = {"task_only": {"a": 0.30, "b": 0.50}, "adamergex": {"a": 0.20, "b": 0.40}, "oracle": {"a": 0.80, "b": 0.60}}
    cal = {"task_only": {"a": 0.40, "b": 0.50}, "adamergex": {"a": 0.60, "b": 0.70}, "oracle": {"a": 0.80, "b": 0.80}}
    return DemoResult(
        settings={"t": 1.0},
        source="src",
        targets=["a", "b"],
        scores={"lora": raw},
        source_scores={"lora": 0.9},
        training={},
        timings={},
        calibrated_scores={"lora": cal},
    )


def test_rows_carry_calibrated_means_and_gap_shares():
    rows = {r["method"]: r for r in table_rows(_result())}
    assert abs(rows["adamergex"]["mean"] - 0.30) < 1e-12
    assert abs(rows["adamergex"]["gap_closed"] - (0.30 - 0.40) / (0.70 - 0.40)) < 1e-12
    assert abs(rows["adamergex"]["calibrated_mean"] - 0.65) < 1e-12
    assert abs(rows["adamergex"]["calibrated_gap_closed"] - (0.65 - 0.45) / (0.80 - 0.45)) < 1e-12
    assert rows["oracle"]["calibrated_scores"] == {"a": 0.80, "b": 0.80}


def test_table_shows_both_columns():
    text = format_table(_result())
    header = text.splitlines()[0].split()
    assert header[:2] == ["adapter", "method"] and "cal" in header and "mean" in header
    adamergex = next(line for line in text.splitlines() if line.split()[1:2] == ["adamergex"])
    # raw a, raw b, mean, gap closed, cal a, cal b, cal mean, cal gap closed
    assert adamergex.split()[2:] == ["20.0", "40.0", "30.0", "-33%", "60.0", "70.0", "65.0", "+57%"]


def test_results_without_calibration_still_format():
    result = _result()
    result.calibrated_scores = {}
    rows = table_rows(result)
    assert all(r["calibrated_mean"] is None for r in rows)
    line = next(line for line in format_table(result).splitlines() if line.split()[1:2] == ["adamergex"])
    assert line.split()[6:] == ["n/a", "n/a", "n/a", "n/a"]
