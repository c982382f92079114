"""Offline by default: every model datasteer loads itself comes from a local directory.

A reference model (and the base model its adapter names), NICE's policy and reward model
and a sentence encoder are loaded with ``local_files_only=True``, so a run never reaches
the Hugging Face Hub behind the user's back. Setting the environment variable
``DATASTEER_ALLOW_DOWNLOADS=1`` lets ``from_pretrained`` fetch a Hub id instead.
(The training model itself is the training framework's to load.)
"""

from __future__ import annotations

import os
from pathlib import Path

from datasteer.errors import ConfigError

#: The environment variable that allows downloads from the Hub.
ALLOW_DOWNLOADS = "DATASTEER_ALLOW_DOWNLOADS"


def downloads_allowed() -> bool:
    """Whether the user opted in to downloads (``DATASTEER_ALLOW_DOWNLOADS=1``)."""
    return os.environ.get(ALLOW_DOWNLOADS, "").strip().lower() in ("1", "true", "yes")


def local_files_only() -> bool:
    """The ``local_files_only`` argument of every ``from_pretrained`` call datasteer makes."""
    return not downloads_allowed()


def require_local(path: str | os.PathLike[str], key: str) -> None:
    """Raise a one-line :class:`ConfigError` naming ``key`` and ``path`` when ``path`` is not
    a local directory and downloads are off."""
    if local_files_only() and not Path(path).is_dir():
        raise ConfigError(
            f"{key}: {str(path)!r} is not a local model directory (datasteer loads models offline; "
            f"set {ALLOW_DOWNLOADS}=1 to let it be downloaded from the Hugging Face Hub)"
        )
