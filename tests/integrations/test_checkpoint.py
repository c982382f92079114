"""Kills while a run saves: the last complete checkpoint always resumes to the uninterrupted run.

A kill is simulated by making the N-th file write of a run (the Trainer's ``torch.save`` and
``trainer_state.json``, the steering state, the run record's appends) write part of its bytes
and then raise :class:`Killed`. The run is then resumed as a user would: from the latest
checkpoint, or, when that one is refused, from the checkpoint the error names.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.factories import without_seconds
from tests.integrations.test_hf_trainer import RecordingTrainer, run
from transformers.trainer_callback import TrainerState

from datasteer.errors import SteeringStateError
from datasteer.integrations.checkpoint import STATE_FILE, TRAINER_STATE, latest_complete, load_state, save_state
from datasteer.runlog import RunLog, read_records

#: Mixing, selection and weighting at once, so that every stage's state must survive.
STEERING = {
    "mix": {"algorithm": "random", "update_every": 2},
    "select": {"algorithm": "random", "warmup_steps": 1, "update_every": 3},
    "weight": {"algorithm": "loss"},
}
STEPS, SAVE = 6, 2


class Killed(BaseException):
    """Stands for the process being killed mid-write."""


#: Decides, for each write (its kind and target), whether the process dies in it.
KillWhen = Callable[[str, str], bool]


@contextmanager
def killed_at(monkeypatch: pytest.MonkeyPatch, kill: KillWhen) -> Iterator[list[tuple[str, str]]]:
    """Every write of the run is listed; the one ``kill`` picks writes half its bytes, then dies."""
    writes: list[tuple[str, str]] = []
    real_save, real_json, real_append = torch.save, TrainerState.save_to_json, RunLog.write

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        target = str(getattr(f, "name", f))
        writes.append(("torch.save", target))
        if not kill("torch.save", target):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if hasattr(f, "write"):
            f.write(data)
        else:
            Path(f).write_bytes(data)
        raise Killed

    def save_to_json(self: TrainerState, json_path: str) -> None:
        writes.append(("trainer_state", json_path))
        if kill("trainer_state", json_path):
            Path(json_path).write_text('{"global_step": ')
            raise Killed
        real_json(self, json_path)

    def append(self: RunLog, record: dict[str, Any]) -> None:
        writes.append(("runlog", f"{self.path}@{record['step']}"))
        if kill("runlog", str(self.path)) and self.enabled:
            with self.path.open("a") as fh:
                fh.write('{"step": ')
            raise Killed
        real_append(self, record)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        patch.setattr(TrainerState, "save_to_json", save_to_json)
        patch.setattr(RunLog, "write", append)
        yield writes


def nth(n: int) -> KillWhen:
    count = iter(range(1, 10**6))
    return lambda kind, target: next(count) == n


def resume_like_a_user(out: Path) -> tuple[RecordingTrainer, int]:
    """Resume from the latest checkpoint; if it is refused, from the one the error names (or
    from scratch when it names none). Returns the trainer and the step it resumed at."""
    try:
        trainer = run(out, STEERING, max_steps=STEPS, save_steps=SAVE, resume=True)  # type: ignore[arg-type]
    except SteeringStateError as err:
        named = re.search(r"resume from (\S+), the latest checkpoint that is complete", str(err))
        assert named or "no earlier checkpoint in its folder is complete" in str(err), err
        trainer = run(out, STEERING, max_steps=STEPS, save_steps=SAVE, resume=named.group(1) if named else None)
    except ValueError as err:  # the Trainer's own: no checkpoint at all
        assert "No valid checkpoint found" in str(err)
        trainer = run(out, STEERING, max_steps=STEPS, save_steps=SAVE)
    first = min(trainer.served())
    return trainer, first - 1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[RecordingTrainer, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("full")
    trainer = run(out, STEERING, max_steps=STEPS, save_steps=SAVE)
    return trainer, without_seconds(read_records(out / "steering.jsonl"))


def check_resumes(out: Path, uninterrupted: tuple[RecordingTrainer, list[dict[str, Any]]]) -> int:
    full, records = uninterrupted
    resumed, at = resume_like_a_user(out)
    assert without_seconds(read_records(out / "steering.jsonl")) == records
    served = full.served()
    assert resumed.served() == {s: served[s] for s in range(at + 1, STEPS + 1)}
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return at


@pytest.mark.parametrize(
    "kill",
    [
        lambda kind, target: kind == "torch.save" and STATE_FILE in target and "checkpoint-4" in target,
        lambda kind, target: kind == "trainer_state" and "checkpoint-4" in target,
        lambda kind, target: kind == "torch.save" and "checkpoint-4" in target and "optimizer" in target,
    ],
    ids=["steering-state", "trainer-state", "optimizer"],
)
def test_a_kill_while_checkpoint_4_is_saved_resumes_from_checkpoint_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    uninterrupted: tuple[RecordingTrainer, list[dict[str, Any]]],
    kill: KillWhen,
) -> None:
    with killed_at(monkeypatch, kill), pytest.raises(Killed):
        run(tmp_path, STEERING, max_steps=STEPS, save_steps=SAVE)
    assert (tmp_path / "checkpoint-4").is_dir() and not (tmp_path / "checkpoint-4" / STATE_FILE).exists()
    # was: "the checkpoint has no steering_state.pt; it was not saved by a steered run"
    with pytest.raises(SteeringStateError, match=r"checkpoint-4 has no .*resume from .*checkpoint-2, the latest"):
        run(tmp_path, STEERING, max_steps=STEPS, save_steps=SAVE, resume=True)  # type: ignore[arg-type]
    assert check_resumes(tmp_path, uninterrupted) == 2


def test_a_record_cut_short_by_a_kill_is_dropped_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: tuple[RecordingTrainer, list[dict[str, Any]]]
) -> None:
    records = iter(range(1, 10**6))
    with killed_at(monkeypatch, lambda kind, target: kind == "runlog" and next(records) == 9), pytest.raises(Killed):
        run(tmp_path, STEERING, max_steps=STEPS, save_steps=SAVE)
    assert not (tmp_path / "steering.jsonl").read_text().endswith("\n")  # a half record at the end
    assert check_resumes(tmp_path, uninterrupted) >= 2


@pytest.mark.slow
def test_a_kill_at_every_write_resumes_from_the_last_complete_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: tuple[RecordingTrainer, list[dict[str, Any]]]
) -> None:
    with killed_at(monkeypatch, lambda kind, target: False) as writes:
        run(tmp_path / "count", STEERING, max_steps=STEPS, save_steps=SAVE)
    total = len(writes)
    assert total > 20
    for n in range(1, total + 1):
        out = tmp_path / f"kill-{n}"
        with killed_at(monkeypatch, nth(n)) as seen, pytest.raises(Killed):
            run(out, STEERING, max_steps=STEPS, save_steps=SAVE)
        kind, target = seen[-1]
        complete = latest_complete(out)
        step = int(complete.name.split("-")[1]) if complete else 0
        if step == STEPS:  # killed after the last checkpoint: training was over (only the closing record is missing)
            assert without_seconds(read_records(out / "steering.jsonl")) == uninterrupted[1][:-1], (n, kind, target)
            continue
        assert check_resumes(out, uninterrupted) == step, (n, kind, target)


# -- unit level: the checkpoint files themselves ------------------------------------------------


def checkpoint(root: Path, step: int, *, trainer_state: bool = True, steering: bytes | None = b"ok") -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if trainer_state:
        (folder / TRAINER_STATE).write_text("{}")
    if steering == b"ok":
        save_state({"step": step}, folder)
    elif steering is not None:
        (folder / STATE_FILE).write_bytes(steering)
    return folder


def test_the_refusal_names_the_latest_complete_checkpoint(tmp_path: Path) -> None:
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 10)
    checkpoint(tmp_path, 12, steering=None)  # killed after the Trainer's files, before ours
    last = checkpoint(tmp_path, 14, trainer_state=False, steering=None)  # killed in the Trainer's save
    assert latest_complete(tmp_path) == tmp_path / "checkpoint-10"
    with pytest.raises(SteeringStateError) as err:
        load_state(last)
    message = str(err.value)
    assert "\n" not in message and f"{last} has no {STATE_FILE}" in message
    assert f"resume from {tmp_path / 'checkpoint-10'}, the latest checkpoint that is complete" in message
    assert load_state(tmp_path / "checkpoint-10") == {"step": 10}


def test_a_state_file_cut_short_is_refused_too(tmp_path: Path) -> None:
    """Written before the writes were atomic: a torch archive cut in half."""
    buffer = io.BytesIO()
    torch.save({"step": 4, "x": torch.zeros(100)}, buffer)
    folder = checkpoint(tmp_path, 4, steering=buffer.getvalue()[:300])
    with pytest.raises(SteeringStateError, match=r"has an unreadable steering_state\.pt .*no earlier checkpoint"):
        load_state(folder)


def test_a_checkpoint_without_the_trainers_state_is_incomplete(tmp_path: Path) -> None:
    checkpoint(tmp_path, 3)
    folder = checkpoint(tmp_path, 6, trainer_state=False)
    with pytest.raises(SteeringStateError, match=rf"has no {TRAINER_STATE}.*checkpoint-3"):
        load_state(folder)
