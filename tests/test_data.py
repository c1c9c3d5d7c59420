"""Reference-data windows: exact cuts on words and characters, streaming, determinism, CLI."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from adamergex_peft.data import (
    build_reference_data,
    iter_reference_records,
    iter_units,
    iter_windows,
    read_jsonl,
    unit_for_language,
)


def test_unit_for_language():
    assert unit_for_language("sw") == "word"
    assert unit_for_language("en") == "word"
    for lang in ("zh", "ja", "th", "zh-Hans", "zh_CN"):
        assert unit_for_language(lang) == "char"
    with pytest.raises(ValueError):
        unit_for_language("")


def test_word_windows_exact(tmp_path):
    # 23 words over several lines and two files; windows of 5 = 4 prompt words + 1 completion word.
    words = [f"w{i}" for i in range(23)]
    (tmp_path / "a.txt").write_text(" ".join(words[:7]) + "\n" + " ".join(words[7:12]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(words[12:]), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    n = build_reference_data([tmp_path / "a.txt", tmp_path / "b.txt"], out, "sw", window_size=5, progress=False)
    rows = list(read_jsonl(out))
    assert n == len(rows) == 4  # 23 // 5; the 3-word tail is dropped
    for k, row in enumerate(rows):
        assert set(row) == {"prompt", "completion"}
        assert row["prompt"] == " ".join(words[5 * k : 5 * k + 4])
        assert row["completion"] == " " + words[5 * k + 4]
        assert (row["prompt"] + row["completion"]).split() == words[5 * k : 5 * k + 5]


def test_char_windows_remove_newlines(tmp_path):
    text = "今天天气\n很好我们\n去公园吧"  # 12 characters once the newlines are removed
    src = tmp_path / "zh.txt"
    src.write_text(text, encoding="utf-8")
    rows = [r.__dict__ for r in iter_reference_records([src], "zh", window_size=4, completion_size=2)]
    assert rows == [
        {"prompt": "今天", "completion": "天气"},
        {"prompt": "很好", "completion": "我们"},
        {"prompt": "去公", "completion": "园吧"},
    ]


def test_words_split_across_chunks_are_rejoined():
    pieces = ["alpha be", "ta gam", "ma\n", "del", "ta"]
    assert list(iter_units(pieces, "word")) == ["alpha", "beta", "gamma", "delta"]


def test_stride_and_max_windows(tmp_path):
    units = [str(i) for i in range(10)]
    assert list(iter_windows(units, 4, stride=2)) == [
        ("0", "1", "2", "3"),
        ("2", "3", "4", "5"),
        ("4", "5", "6", "7"),
        ("6", "7", "8", "9"),
    ]
    assert list(iter_windows(units, 3, stride=4)) == [("0", "1", "2"), ("4", "5", "6")]
    src = tmp_path / "t.txt"
    src.write_text(" ".join(units), encoding="utf-8")
    assert len(list(iter_reference_records([src], "en", window_size=2, max_windows=3))) == 3
    with pytest.raises(ValueError):
        list(iter_windows(units, 1))
    with pytest.raises(ValueError):
        list(iter_reference_records([src], "en", window_size=4, completion_size=4))


def test_deterministic_and_folder_input(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for name in ("b.txt", "a.txt", "c.md"):
        (folder / name).write_text(f"{name} " * 30, encoding="utf-8")
    out1, out2 = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    build_reference_data([folder], out1, "de", window_size=8, progress=False)
    build_reference_data([folder], out2, "de", window_size=8, progress=False)
    assert out1.read_bytes() == out2.read_bytes()
    rows = list(read_jsonl(out1))
    assert rows[0]["prompt"].startswith("a.txt")  # sorted order, .md ignored
    assert all("c.md" not in r["prompt"] + r["completion"] for r in rows)


def test_streaming_uses_constant_memory(tmp_path):
    # A ~5.5 MB one-line file: memory while streaming must not grow with the file size.
    src = tmp_path / "big.txt"
    line = " ".join(f"tok{i % 997}" for i in range(200_000))
    with open(src, "w", encoding="utf-8") as handle:
        for _ in range(4):
            handle.write(line + " ")
    tracemalloc.start()
    count = 0
    for _ in iter_reference_records([src], "en", window_size=512):
        count += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == (4 * 200_000) // 512
    assert peak < 2 * (1 << 20)  # a few 64 KiB read chunks, never the whole file (> 5 MB)
    assert src.stat().st_size > 5 * (1 << 20)


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(OSError):
        build_reference_data([tmp_path / "nope.txt"], tmp_path / "o.jsonl", "en", progress=False)
    assert not (tmp_path / "o.jsonl").exists()


def test_cli(tmp_path, capsys):
    from adamergex_peft.cli import main

    src = tmp_path / "sw.txt"
    src.write_text("moja mbili tatu nne tano sita saba nane", encoding="utf-8")
    out = tmp_path / "sw.jsonl"
    rc = main(
        [
            "build-reference-data",
            "--lang",
            "sw",
            "--input",
            str(src),
            "--output",
            str(out),
            "--window-size",
            "4",
            "--no-progress",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {"prompt": "moja mbili tatu", "completion": " nne"},
        {"prompt": "tano sita saba", "completion": " nane"},
    ]
    assert "wrote 2 windows" in capsys.readouterr().out
