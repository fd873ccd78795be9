"""One rule for every JSON-lines file of a run directory, on real damaged files: what a kill cut off at the end is
left out and the run resumes; a damaged line before it is an error naming the file and the line, in the runs
that resume and in the report alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medpfl.errors import MedPFLError
from medpfl.experiments.train_run import TrainRunConfig, run_training
from medpfl.jsonl import append_jsonl, read_jsonl
from medpfl.report import build_report

RECORDS = [{"round": r, "accuracy": 0.25 * r} for r in (1, 2, 3)]
# 16 px, 2 sites of 6 images, one local step a round: seconds.
TINY = TrainRunConfig(image_size=16, sites=2, site_images=6, rounds=2, local_epochs=1, local_batch=64)


def _written(file: Path) -> bytes:
    for record in RECORDS:
        append_jsonl(file, record)
    return file.read_bytes()


def test_a_record_cut_off_by_a_kill_is_left_out_and_the_next_append_redoes_it(tmp_path):
    file = tmp_path / "rounds.jsonl"
    whole = _written(file)
    file.write_bytes(whole + b'{"round": 4, "accur')  # killed mid-write
    assert read_jsonl(file) == RECORDS
    append_jsonl(file, {"round": 4, "accuracy": 1.0})  # the resumed run redoes that record
    assert file.read_bytes() == whole + b'{"round": 4, "accuracy": 1.0}\n'
    assert read_jsonl(file) == [*RECORDS, {"round": 4, "accuracy": 1.0}]


def test_a_whole_last_record_without_its_newline_counts_and_is_kept_apart(tmp_path):
    file = tmp_path / "rounds.jsonl"
    file.write_bytes(_written(file).rstrip(b"\n"))
    assert read_jsonl(file) == RECORDS
    append_jsonl(file, {"round": 4})
    assert read_jsonl(file) == [*RECORDS, {"round": 4}]


def test_a_damaged_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    file = tmp_path / "cells.jsonl"
    lines = _written(file).decode().splitlines(keepends=True)
    damaged = lines[0] + lines[1][:9] + "\n" + lines[2]
    file.write_text(damaged)
    with pytest.raises(MedPFLError, match=r"cells\.jsonl' line 2 is not a readable record"):
        read_jsonl(file)
    assert file.read_text() == damaged
    assert read_jsonl(tmp_path / "missing.jsonl") == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A finished tiny training run and its rounds, uninterrupted."""
    out = tmp_path_factory.mktemp("train") / "whole"
    run_training(TINY, out)
    return out, read_jsonl(out / "rounds.jsonl")


def _without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


def test_a_training_run_killed_while_writing_a_round_resumes_and_redoes_it(tmp_path, trained):
    out = tmp_path / "killed"

    def stop_after_round_one(done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(TINY, out, progress=stop_after_round_one)
    rounds = out / "rounds.jsonl"
    rounds.write_bytes(rounds.read_bytes() + b'{"round": 2, "accuracy": 0.')  # round 2's record, cut by a kill
    run_training(TINY, out)
    assert _without_timings(read_jsonl(rounds)) == _without_timings(trained[1])


def test_a_damaged_round_record_is_named_by_training_and_by_the_report(tmp_path, trained):
    out = tmp_path / "damaged"
    out.mkdir()
    for file in trained[0].iterdir():
        if file.is_file():
            (out / file.name).write_bytes(file.read_bytes())
    lines = (out / "rounds.jsonl").read_text().splitlines(keepends=True)
    (out / "rounds.jsonl").write_text(lines[0][:20] + "\n" + "".join(lines[1:]))
    with pytest.raises(MedPFLError, match=r"rounds\.jsonl' line 1 is not a readable record"):
        build_report(out)
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["rounds"] == TINY.rounds
    with pytest.raises(MedPFLError, match=r"rounds\.jsonl' line 1 is not a readable record"):
        run_training(TINY, out)
