"""The run record: a last line cut short by a crash never breaks a resume; rewrites are atomic."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from datasteer import atomic
from datasteer.errors import SteeringStateError
from datasteer.runlog import RunLog, read_records


def written(path: Path, steps: list[int]) -> RunLog:
    log = RunLog(path)
    for step in steps:
        log.write({"step": step, "paradigm": "mix", "value": step / 2})
    return log


def test_a_last_line_cut_short_is_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = written(tmp_path / "steering.jsonl", [0, 1, 2])
    with log.path.open("a") as fh:
        fh.write('{"step": 3, "paradigm": "mi')  # the crash came while this record was appended
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_records(log.path)] == [0, 1, 2]
        log.truncate_after(1)  # a resume from step 1
    assert "its last line is cut short" in caplog.text
    assert (
        log.path.read_text()
        == '{"step": 0, "paradigm": "mix", "value": 0.0}\n{"step": 1, "paradigm": "mix", "value": 0.5}\n'
    )
    log.write({"step": 2, "paradigm": "mix", "value": 1.0})
    assert [r["step"] for r in read_records(log.path)] == [0, 1, 2]


def test_a_damaged_line_before_the_last_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "steering.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, oops\n{"step": 2}\n')
    with pytest.raises(SteeringStateError, match="line 2 is not a JSON record"):
        RunLog(path).truncate_after(5)
    assert path.read_text().count("\n") == 3  # left as it was


def test_a_kill_during_truncation_leaves_the_whole_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = written(tmp_path / "steering.jsonl", [0, 1, 2, 3])
    before = log.path.read_text()

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        log.truncate_after(1)
    with pytest.raises(KeyboardInterrupt):
        log.start_fresh()
    assert log.path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steering.jsonl"]


def test_a_fresh_run_empties_the_old_file(tmp_path: Path) -> None:
    log = written(tmp_path / "steering.jsonl", [0, 1])
    log.start_fresh()
    assert log.path.read_text() == "" and read_records(log.path) == []
