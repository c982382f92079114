"""Atomic file writes: a file is either its old content or its new one, never a part.

Each write goes to a temporary file in the same directory (the same file system), is
flushed to disk, and replaces the target with :func:`os.replace`, so a run killed while
it saves leaves no half-written checkpoint state, run record or JSON behind.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch


@contextmanager
def _replacing(path: str | os.PathLike[str], mode: str) -> Iterator[IO[Any]]:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        # "x": created here, never an existing file; the umask applies (mkstemp's are private).
        with open(tmp, mode.replace("w", "x")) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with _replacing(path, "w") as fh:
        fh.write(text)


def write_with(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Replace ``path`` atomically with what ``write`` writes to the binary file it is given."""
    with _replacing(path, "wb") as fh:
        write(fh)


def torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)``, atomically."""
    write_with(path, lambda fh: torch.save(obj, fh))
