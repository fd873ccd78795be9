"""Resuming a run directory: a kill's half-written last line is redone, any other damage is named, and
finished results are never rewritten or lost."""

from __future__ import annotations

import json
import time

import pytest

from medpfl.errors import MedPFLError
from medpfl.experiments.run_dir import append_result, open_run_dir, read_results

CONFIG = {"attack": "idlg", "seed": 0}


def finished_run(tmp_path, n: int = 3):
    path = open_run_dir(tmp_path / "run", CONFIG)
    for v in range(n):
        append_result(path, {"victim": v, "ssim": [0.5 + v / 10]})
    return path


def test_resuming_an_intact_run_does_not_rewrite_its_results(tmp_path):
    path = finished_run(tmp_path)
    before = (path / "results.jsonl").stat().st_mtime_ns
    time.sleep(0.01)
    open_run_dir(path, CONFIG)
    assert (path / "results.jsonl").stat().st_mtime_ns == before


def test_a_line_cut_short_by_a_kill_is_dropped_and_only_it(tmp_path):
    path = finished_run(tmp_path)
    whole = (path / "results.jsonl").read_bytes()
    (path / "results.jsonl").write_bytes(whole + b'{"victim": 3, "ssim": [0.')  # killed mid-write
    assert [r["victim"] for r in read_results(path)] == [0, 1, 2]
    open_run_dir(path, CONFIG)  # resume
    assert (path / "results.jsonl").read_bytes() == whole  # the finished lines, byte for byte
    append_result(path, {"victim": 3, "ssim": [0.8]})
    assert [r["victim"] for r in read_results(path)] == [0, 1, 2, 3]


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    path = finished_run(tmp_path)
    file = path / "results.jsonl"
    file.write_bytes(file.read_bytes().rstrip(b"\n"))
    open_run_dir(path, CONFIG)
    append_result(path, {"victim": 3, "ssim": [0.8]})
    assert [r["victim"] for r in read_results(path)] == [0, 1, 2, 3]


def test_a_damaged_line_before_the_last_is_named_and_nothing_is_changed(tmp_path):
    path = finished_run(tmp_path, n=4)
    file = path / "results.jsonl"
    lines = file.read_text().splitlines(keepends=True)
    damaged = "".join([lines[0], lines[1][:15] + "\n", *lines[2:]])
    file.write_text(damaged)
    with pytest.raises(MedPFLError, match=r"results\.jsonl' line 2 "):
        list(read_results(path))
    with pytest.raises(MedPFLError, match=r"line 2"):
        open_run_dir(path, CONFIG)
    assert file.read_text() == damaged  # nothing deleted, nothing rewritten
    assert json.loads((path / "config.json").read_text())["config"] == CONFIG
