"""Prepared selection files: what ``datasteer prepare`` writes and a selector reads back.

A prepared result is a directory holding ``<kind>.safetensors`` (the tensors, e.g. NEAR's
neighbour lists or TSDS's probabilities) and ``<kind>.json`` (format, fingerprint,
settings and notes for humans). Nothing is pickled. The JSON is written last, so a
directory without it is incomplete.

The **fingerprint** ties the file to the training pool and the preparation settings: the
token ids of every pool row in pool order, each row's domain, the domain names, the token
ids of every target row, and the algorithm's preparation settings. The online selector
recomputes it from the rows it trains on (:func:`pool_fingerprint`) and refuses a file
whose fingerprint differs, so a changed dataset, cutoff length, template or setting is
caught instead of silently selecting the wrong rows. The settings include the architecture
of the model that embedded the rows (:func:`embedding_settings`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from datasteer.errors import SteeringStateError

__all__ = [
    "FORMAT",
    "embedding_settings",
    "fingerprint",
    "pool_fingerprint",
    "read_prepared",
    "row_token_ids",
    "write_prepared",
]

#: The training model's config keys a prepared file is tied to (when it embedded the rows).
MODEL_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")

FORMAT = "datasteer-prepared/1"

# What every digest starts with: a format tag and empty "model" and "model_state" slots
# (the latter filled with a hashed None in `fingerprint`). Earlier versions could hash model
# weights there; the bytes are kept so that files they prepared keep their fingerprints.
_DIGEST_PREFIX = b"datasteer-features/1" + b"model" + b"model_state"


def _hash_into(h: Any, obj: object) -> None:
    """Feed ``obj`` into ``h`` with type tags and lengths, so distinct values never collide
    by concatenation (``["ab"]`` vs ``["a", "b"]``)."""
    if obj is None or isinstance(obj, bool | int | float | str):
        # repr is exact for these (floats round-trip), and tags the type implicitly.
        text = f"{type(obj).__name__}:{obj!r}".encode()
        h.update(struct.pack("<Q", len(text)) + text)
    elif isinstance(obj, bytes):
        h.update(b"bytes" + struct.pack("<Q", len(obj)) + obj)
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"ndarray:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"map" + struct.pack("<Q", len(obj)))
        for key in sorted(obj, key=str):
            _hash_into(h, str(key))
            _hash_into(h, obj[key])
    elif isinstance(obj, list | tuple):
        if obj and all(isinstance(x, int) and not isinstance(x, bool) for x in obj):
            # Fast path for token ids and index lists: one array instead of n objects.
            _hash_into(h, np.asarray(obj, dtype=np.int64))
            return
        h.update(b"seq" + struct.pack("<Q", len(obj)))
        for item in obj:
            _hash_into(h, item)
    else:
        # repr() of arbitrary objects may contain memory addresses and change every run.
        raise TypeError(
            f"cannot fingerprint a {type(obj).__name__}; pass None, str, numbers, bytes, numpy "
            "arrays, or lists / dicts of them"
        )


def fingerprint(*, data: object, settings: Mapping[str, object]) -> str:
    """A SHA-256 hex digest of ``data`` and ``settings``.

    Args:
        data: None, strings, numbers, bytes, numpy arrays and nested lists / dicts of them.
            The structure is hashed, not just the bytes.
        settings: plain values, as ``data``.

    Returns:
        A 64-character hex string.
    """
    h = hashlib.sha256(_DIGEST_PREFIX)
    _hash_into(h, None)  # the empty "model_state" slot
    h.update(b"data")
    _hash_into(h, data)
    h.update(b"settings")
    _hash_into(h, dict(settings))
    return h.hexdigest()


def row_token_ids(dataset: Any) -> list[list[int]]:
    """The ``input_ids`` of every row of a map-style dataset, in order."""
    return [list(dataset[i]["input_ids"]) for i in range(len(dataset))]


def embedding_settings(settings: Mapping[str, object], model: Any) -> dict[str, object]:
    """What a prepared file depends on: the algorithm's settings and, unless a local
    ``encoder`` (named in the settings) embedded the rows, the training model's architecture
    (``MODEL_KEYS`` of its config), so that a file prepared with another model is refused.
    The weights are not part of it: they change as the run trains."""
    out = dict(settings)
    if out.get("encoder") is None and model is not None:
        config = model.config
        out["model"] = {key: getattr(config, key, None) for key in MODEL_KEYS}
    return out


def pool_fingerprint(
    *,
    pool_ids: Sequence[Sequence[int]],
    domains: torch.Tensor | np.ndarray,
    domain_names: Sequence[str],
    target_ids: Sequence[Sequence[Sequence[int]]],
    settings: Mapping[str, object],
) -> str:
    """SHA-256 of the pool rows, their domains, the target rows and the settings.

    Args:
        pool_ids: token ids of each pool row, in pool order.
        domains: domain id of each pool row.
        domain_names: the names of the domain ids.
        target_ids: for each target set (in the order the run sees them), its rows' token ids.
        settings: the preparation settings of the algorithm (plain values).
    """
    data = {
        "pool": [list(map(int, row)) for row in pool_ids],
        "domains": np.asarray(domains, dtype=np.int64),
        "domain_names": [str(n) for n in domain_names],
        "targets": [[list(map(int, row)) for row in rows] for rows in target_ids],
    }
    return fingerprint(data=data, settings=settings)


def _paths(directory: str | os.PathLike[str], kind: str) -> tuple[Path, Path]:
    root = Path(directory)
    return root / f"{kind}.safetensors", root / f"{kind}.json"


def write_prepared(
    directory: str | os.PathLike[str],
    kind: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    fingerprint: str,
    settings: Mapping[str, Any],
    notes: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``tensors`` and their JSON record into ``directory``; returns the JSON path."""
    data_path, meta_path = _paths(directory, kind)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # a crash below then leaves no record, never a stale one
    tmp = data_path.with_name(f"{data_path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, data_path)
    record = {
        "format": FORMAT,
        "kind": kind,
        "fingerprint": fingerprint,
        "settings": dict(settings),
        "file": data_path.name,
        "notes": dict(notes or {}),
    }
    tmp_meta = meta_path.with_name(f"{meta_path.name}.tmp-{os.getpid()}")
    tmp_meta.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_meta, meta_path)
    return meta_path


def read_prepared(directory: str | os.PathLike[str], kind: str, expected: str) -> dict[str, torch.Tensor]:
    """Load the tensors of a prepared ``kind`` whose fingerprint is ``expected``.

    Raises:
        SteeringStateError: the file is missing, incomplete, of another kind, or was prepared
            for another pool or other settings; the message says how to rebuild it.
    """
    data_path, meta_path = _paths(directory, kind)
    fix = f"run `datasteer prepare {kind} CONFIG` with this run's config"
    try:
        record = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise SteeringStateError(f"no prepared {kind} file at {meta_path}; {fix}") from None
    except json.JSONDecodeError as err:
        raise SteeringStateError(f"{meta_path} is not valid JSON ({err}); {fix}") from None
    if record.get("format") != FORMAT or record.get("kind") != kind:
        raise SteeringStateError(f"{meta_path} is not a prepared {kind} file ({FORMAT}); {fix}")
    if record.get("fingerprint") != expected:
        raise SteeringStateError(
            f"{meta_path} was prepared for another pool or other settings "
            f"(fingerprint {str(record.get('fingerprint'))[:12]}, this run {expected[:12]}); {fix}"
        )
    if not data_path.is_file():
        raise SteeringStateError(f"{data_path} is missing; {fix}")
    return load_file(str(data_path))
