"""Atomic writes: a kill at any point leaves the old file or the new one, never a part."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

import pytest
import torch

from datasteer import atomic


class Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing may catch it as an error)."""


def test_a_write_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "weights.json"
    atomic.write_text(path, "old\n")
    atomic.write_text(path, "new\n")
    assert path.read_text() == "new\n" and os.listdir(path.parent) == ["weights.json"]
    atomic.torch_save({"x": torch.arange(3)}, tmp_path / "state.pt")
    assert torch.equal(torch.load(tmp_path / "state.pt", weights_only=True)["x"], torch.arange(3))


def test_a_kill_while_writing_leaves_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    atomic.torch_save({"step": 1}, path)

    def half_then_killed(fh: IO[bytes]) -> None:
        fh.write(b"PK\x03\x04 half an archive")
        raise Killed

    with pytest.raises(Killed):
        atomic.write_with(path, half_then_killed)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.pt"]  # the temporary file is gone too


def test_a_kill_before_the_rename_leaves_the_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text("kept\n")

    def killed(*args: object) -> None:
        raise Killed

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(Killed):
        atomic.write_text(path, "lost\n")
    assert path.read_text() == "kept\n"


def test_the_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644  # not mkstemp's 0o600
