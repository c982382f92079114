"""The steering state inside each Trainer checkpoint: written atomically, checked on resume.

The Trainer writes ``checkpoint-N/`` (model, optimizer, ``trainer_state.json``, ...) and
then calls ``on_save``, where ``steering_state.pt`` is written last, through a temporary
file and :func:`os.replace`. So a checkpoint whose steering state is present is complete,
and a run killed while it saved leaves a last checkpoint without one. Resuming from such a
checkpoint is refused before anything loads, with the name of the latest checkpoint that
is complete.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from datasteer import atomic
from datasteer.errors import SteeringStateError

#: File holding the steering state inside each checkpoint folder.
STATE_FILE = "steering_state.pt"
#: What the Trainer writes last into a checkpoint folder (before our state file).
TRAINER_STATE = "trainer_state.json"

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def save_state(payload: dict[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Write ``payload`` as ``folder/steering_state.pt``, atomically; returns the path."""
    path = Path(folder) / STATE_FILE
    atomic.torch_save(payload, path)
    return path


def is_complete(folder: str | os.PathLike[str]) -> bool:
    """Whether a checkpoint folder holds the Trainer's state and a steering state."""
    return (Path(folder) / TRAINER_STATE).is_file() and (Path(folder) / STATE_FILE).is_file()


def latest_complete(output_dir: str | os.PathLike[str], before: int | None = None) -> Path | None:
    """The complete ``checkpoint-N`` of ``output_dir`` with the largest N (below ``before``)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _CHECKPOINT.match(p.name)) and p.is_dir() and (before is None or int(m.group(1)) < before)
    ]
    return next((p for _, p in sorted(found, reverse=True) if is_complete(p)), None)


def _step_of(folder: Path) -> int | None:
    match = _CHECKPOINT.match(folder.name)
    return int(match.group(1)) if match else None


def load_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The steering state saved in checkpoint ``folder``.

    Raises:
        SteeringStateError: the folder has no complete steering state (a run stopped while
            it saved this checkpoint, or a run that was not steered); the message names the
            latest earlier checkpoint that is complete, if there is one.
    """
    path = Path(folder)
    file = path / STATE_FILE
    problem = None
    if not file.is_file():
        problem = f"has no {STATE_FILE}"
    elif not (path / TRAINER_STATE).is_file():
        problem = f"has no {TRAINER_STATE}"
    else:
        try:
            state: dict[str, Any] = torch.load(file, weights_only=True)
            return state
        except Exception as err:  # a file that is not a whole torch archive, whatever the reader says
            problem = f"has an unreadable {STATE_FILE} ({type(err).__name__})"
    step = _step_of(path)
    previous = latest_complete(path.parent, before=step) if step is not None else None
    instead = (
        f"resume from {previous}, the latest checkpoint that is complete"
        if previous is not None
        else "no earlier checkpoint in its folder is complete"
    )
    raise SteeringStateError(
        f"{path} {problem}: it is not a complete steered checkpoint (the run stopped while saving it, "
        f"or was not steered); {instead}"
    )
