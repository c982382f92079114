"""On-disk feature store keyed by a fingerprint, and streaming similarity over it.

Features (embeddings, projected gradients) are stored as a plain ``.npy`` file plus a
small JSON sidecar that records the shape, dtype and a **fingerprint** of what produced
them (model weights, data, op settings). Nothing is pickled.

* A store is complete only once its sidecar exists: rows are written to a temporary file,
  which is renamed into place, and only then is the sidecar written (atomically). A crash
  at any point leaves either the previous complete store or no sidecar at all, never a
  half-written file that looks finished.
* :meth:`FeatureStore.get_or_compute` reuses a store only when its fingerprint matches,
  and logs why it recomputes otherwise.
* :func:`topk_similarity` and :func:`mean_similarity` read the store in row chunks with
  ordinary file reads (not a memory map, whose touched pages would count towards the
  process's resident memory), so peak memory does not grow with the pool size.

Both scoring functions take an optional row range ``[start, stop)`` and return global row
indices, so a caller can score one rank's share and gather (see :func:`merge_topk`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FORMAT = "datasteer-features/1"
Metric = Literal["cosine", "dot"]
ArrayLike = np.ndarray | torch.Tensor

_NPY_MAGIC = b"\x93NUMPY\x01\x00"
# Header bytes reserved at the start of the .npy file. The shape is only known when the
# last row is written, so the header is written last into a fixed-size slot; 128 bytes
# (a multiple of numpy's 64-byte alignment) holds any 2-D shape of a plain dtype.
_HEADER_BYTES = 128
_BLOCK_BYTES = 4 << 20


# --------------------------------------------------------------------------- fingerprint


def _hash_into(h: Any, obj: object) -> None:
    """Feed ``obj`` into ``h`` with type tags and lengths, so distinct values never collide
    by concatenation (``["ab"]`` vs ``["a", "b"]``)."""
    if obj is None or isinstance(obj, bool | int | float | str):
        # repr is exact for these (floats round-trip), and tags the type implicitly.
        text = f"{type(obj).__name__}:{obj!r}".encode()
        h.update(struct.pack("<Q", len(text)) + text)
    elif isinstance(obj, bytes):
        h.update(b"bytes" + struct.pack("<Q", len(obj)) + obj)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}".encode())
        # Viewing as bytes works for every dtype, including bfloat16 (numpy has none).
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
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
            f"cannot fingerprint a {type(obj).__name__}; pass str, numbers, bytes, tensors, "
            "arrays, or lists / dicts of them"
        )


def _hash_model(h: Any, model: nn.Module) -> None:
    # One parameter at a time, so only one tensor's bytes are ever copied to the CPU.
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        _hash_into(h, name)
        _hash_into(h, tensor)


def fingerprint(
    *,
    model: nn.Module | None = None,
    model_state: str | None = None,
    data: object,
    settings: Mapping[str, object],
) -> str:
    """A SHA-256 hex digest of what a feature store depends on.

    Args:
        model: hash the bytes of every parameter and buffer (streamed one tensor at a
            time). Under sharded training (FSDP, ZeRO-3) the local tensors are shards or
            placeholders; pass ``model_state`` instead.
        model_state: a string that identifies the weights, e.g. ``"run-7/step-500"``.
            Cheaper than hashing; the caller vouches that it changes with the weights.
        data: what the features were computed on, e.g. ``{"indices": [...],
            "input_ids": [[...], ...]}`` or a dataset fingerprint string. Strings,
            numbers, bytes, tensors, arrays and nested lists / dicts of them.
        settings: the op's settings (method, layer, pooling, proj_dim, seed, ...).

    Returns:
        A 64-character hex string.
    """
    h = hashlib.sha256(FORMAT.encode())
    h.update(b"model")
    if model is not None:
        _hash_model(h, model)
    h.update(b"model_state")
    _hash_into(h, model_state)
    h.update(b"data")
    _hash_into(h, data)
    h.update(b"settings")
    _hash_into(h, dict(settings))
    return h.hexdigest()


# --------------------------------------------------------------------------- npy files


def _npy_header(shape: tuple[int, int], dtype: np.dtype) -> bytes:
    body = repr({"descr": dtype.str, "fortran_order": False, "shape": shape}).encode()
    room = _HEADER_BYTES - len(_NPY_MAGIC) - 2
    if len(body) + 1 > room:
        raise ValueError(f"shape {shape} / dtype {dtype} does not fit the reserved .npy header")
    text = body.ljust(room - 1) + b"\n"  # numpy pads with spaces, ends with a newline
    return _NPY_MAGIC + struct.pack("<H", room) + text


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` of an open ``.npy`` file (any header version)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran:
        raise ValueError("Fortran-ordered feature files are not supported")
    return tuple(shape), np.dtype(dtype), f.tell()


class FeatureWriter:
    """Appends row chunks to a temporary ``.npy`` file; :meth:`commit` makes it the store.

    Use as a context manager (commits on success, discards on an exception), or call
    :meth:`write` and :meth:`commit` yourself. Until :meth:`commit` returns, the store's
    previous content (if its fingerprint is asked for) stays the valid one.
    """

    def __init__(
        self, store: FeatureStore, fingerprint: str, *, rows: int | None, dtype: Any, meta: Mapping[str, Any]
    ) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self.rows = rows
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"feature dtype must be float32 or float16, got {self.dtype}")
        self.meta = dict(meta)
        self.written = 0
        self.dim: int | None = None
        store.directory.mkdir(parents=True, exist_ok=True)
        # Unique per process, so ranks writing the same store never share a temp file.
        self.tmp_path = store.data_path.with_name(f"{store.data_path.name}.tmp-{os.getpid()}-{id(self):x}")
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort
        self._file.write(b"\0" * _HEADER_BYTES)

    def write(self, chunk: ArrayLike) -> None:
        """Append ``chunk`` (``(r, d)`` rows, or one ``(d,)`` row)."""
        if isinstance(chunk, torch.Tensor):
            t = chunk.detach().cpu()
            arr = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16
        else:
            arr = np.asarray(chunk)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise ValueError(f"feature chunks must be 2-D (rows, dim), got shape {arr.shape}")
        if self.dim is None:
            self.dim = int(arr.shape[1])
        elif arr.shape[1] != self.dim:
            raise ValueError(f"chunk has {arr.shape[1]} columns, the store has {self.dim}")
        if self.rows is not None and self.written + len(arr) > self.rows:
            raise ValueError(f"more rows written than the {self.rows} announced")
        # Convert a few MiB at a time: a full-size converted copy of a big chunk would
        # make peak memory depend on the caller's chunk size.
        block = max(1, _BLOCK_BYTES // max(1, self.dim * self.dtype.itemsize))
        for first in range(0, len(arr), block):
            self._file.write(np.ascontiguousarray(arr[first : first + block], dtype=self.dtype).data)
        self.written += len(arr)

    def commit(self) -> None:
        """Finish the file and publish it: data file first, then the sidecar."""
        if self.rows is not None and self.written != self.rows:
            self.abort()
            raise ValueError(f"{self.written} rows written, {self.rows} announced")
        shape = (self.written, self.dim or 0)
        self._file.seek(0)
        self._file.write(_npy_header(shape, self.dtype))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        side = self.store.sidecar_path
        # Remove the old sidecar before replacing the data: a crash in between then leaves
        # no sidecar (recompute), never an old sidecar describing new data.
        side.unlink(missing_ok=True)
        os.replace(self.tmp_path, self.store.data_path)
        record = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "shape": list(shape),
            "dtype": self.dtype.name,
            "file": self.store.data_path.name,
            "meta": self.meta,
        }
        tmp_side = side.with_name(f"{side.name}.tmp-{os.getpid()}-{id(self):x}")
        tmp_side.write_text(json.dumps(record, indent=2, sort_keys=True))
        os.replace(tmp_side, side)
        logger.debug("feature store %s: wrote %s %s", self.store.data_path, shape, self.dtype.name)

    def abort(self) -> None:
        """Discard the temporary file; the store is left as it was."""
        if not self._file.closed:
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class FeatureStore:
    """A fingerprinted ``(n, d)`` float32 / float16 feature array on disk.

    Args:
        directory: where ``<name>.npy`` and ``<name>.json`` live (created on write).
        name: file stem, so one directory can hold several stores.
    """

    def __init__(self, directory: str | os.PathLike[str], name: str = "features") -> None:
        self.directory = Path(directory)
        self.name = name
        self.data_path = self.directory / f"{name}.npy"
        self.sidecar_path = self.directory / f"{name}.json"

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.directory)!r}, name={self.name!r})"

    def sidecar(self) -> dict[str, Any] | None:
        """The sidecar record, or ``None`` when there is no complete store."""
        try:
            record: dict[str, Any] = json.loads(self.sidecar_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return record

    def check(self, fingerprint: str) -> tuple[bool, str]:
        """``(usable, reason)``: whether a complete store with ``fingerprint`` is on disk."""
        record = self.sidecar()
        if record is None:
            return False, "no complete store (missing sidecar)"
        if record.get("format") != FORMAT:
            return False, f"format {record.get('format')!r} is not {FORMAT!r}"
        if record.get("fingerprint") != fingerprint:
            return False, f"fingerprint changed ({str(record.get('fingerprint'))[:12]} -> {fingerprint[:12]})"
        try:
            with open(self.data_path, "rb") as f:
                shape, dtype, offset = _read_npy_header(f)
                size = os.fstat(f.fileno()).st_size
        except (FileNotFoundError, ValueError) as err:
            return False, f"data file unreadable ({err})"
        if list(shape) != record["shape"] or dtype.name != record["dtype"]:
            return False, f"data file {shape} {dtype} does not match the sidecar"
        if size != offset + int(np.prod(shape)) * dtype.itemsize:
            return False, "data file is truncated"
        return True, "fingerprint matches"

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, d)`` of the complete store."""
        with open(self.data_path, "rb") as f:
            shape, _, _ = _read_npy_header(f)
        return int(shape[0]), int(shape[1])

    def writer(
        self, fingerprint: str, *, rows: int | None = None, dtype: Any = np.float32, meta: Mapping[str, Any] = {}
    ) -> FeatureWriter:
        """A :class:`FeatureWriter` that replaces this store when committed.

        Args:
            fingerprint: what the new rows were computed from (see :func:`fingerprint`).
            rows: the number of rows that will be written, checked at commit (optional).
            dtype: ``float32`` or ``float16`` on disk.
            meta: JSON-serialisable notes kept in the sidecar (settings, for humans).
        """
        return FeatureWriter(self, fingerprint, rows=rows, dtype=dtype, meta=meta)

    def save(
        self,
        fingerprint: str,
        features: ArrayLike,
        *,
        dtype: Any = np.float32,
        meta: Mapping[str, Any] = {},
        chunk_rows: int = 65536,
    ) -> None:
        """Write a whole ``(n, d)`` array, in chunks of ``chunk_rows``."""
        with self.writer(fingerprint, rows=len(features), dtype=dtype, meta=meta) as w:
            for start in range(0, len(features), chunk_rows):
                w.write(features[start : start + chunk_rows])

    def open(self) -> np.memmap:
        """Read-only memory map of the whole array, for random access to a few rows."""
        mm: np.memmap = np.load(self.data_path, mmap_mode="r")
        return mm

    def iter_chunks(
        self, chunk_rows: int, start: int = 0, stop: int | None = None, *, reuse_buffer: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, rows)`` chunks of rows ``[start, stop)``, read with plain file reads.

        Nothing of the file stays mapped in this process. With ``reuse_buffer`` every chunk
        is a view of one buffer that the next chunk overwrites: no allocation per chunk
        (repeated large allocations fragment the heap and make resident memory creep up).
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        with open(self.data_path, "rb") as f:
            shape, dtype, offset = _read_npy_header(f)
            n, d = int(shape[0]), int(shape[1])
            stop = n if stop is None else min(stop, n)
            row_bytes = d * dtype.itemsize
            shared = np.empty(min(chunk_rows, max(stop - start, 0)) * d, dtype=dtype) if reuse_buffer else None
            for first in range(start, stop, chunk_rows):
                count = min(chunk_rows, stop - first)
                # A prefix of a flat buffer, so the view stays contiguous for readinto.
                buf = np.empty((count, d), dtype=dtype) if shared is None else shared[: count * d].reshape(count, d)
                f.seek(offset + first * row_bytes)
                if f.readinto(buf.data.cast("B")) != count * row_bytes:
                    raise OSError(f"{self.data_path} ended early at row {first}")
                yield first, buf

    def get_or_compute(
        self,
        fingerprint: str,
        compute_fn: Callable[[], ArrayLike | Iterable[ArrayLike]],
        *,
        dtype: Any = np.float32,
        meta: Mapping[str, Any] = {},
    ) -> FeatureStore:
        """Reuse the store if its fingerprint matches, else recompute and write it.

        Args:
            fingerprint: the wanted fingerprint.
            compute_fn: returns the features, either as one ``(n, d)`` array / tensor or as
                an iterable of row chunks (streamed to disk, never held together).
            dtype: on-disk dtype of a recomputed store.
            meta: notes for the sidecar.

        Returns:
            ``self``, now holding the features for ``fingerprint``.
        """
        usable, reason = self.check(fingerprint)
        if usable:
            logger.info("feature store %s: reusing (%s)", self.data_path, reason)
            return self
        logger.info("feature store %s: recomputing, %s", self.data_path, reason)
        result = compute_fn()
        if isinstance(result, np.ndarray | torch.Tensor):
            self.save(fingerprint, result, dtype=dtype, meta=meta)
        else:
            with self.writer(fingerprint, dtype=dtype, meta=meta) as w:
                for chunk in result:
                    w.write(chunk)
        return self


# --------------------------------------------------------------------------- similarity


def _chunks(
    source: FeatureStore | ArrayLike, chunk_rows: int, start: int, stop: int | None, normalize: bool
) -> Iterator[tuple[int, torch.Tensor]]:
    """Float32 row chunks of ``[start, stop)``, L2-normalised in place when asked.

    Every chunk is a view of one reused buffer (consume it before the next one).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if isinstance(source, FeatureStore):
        n, d = source.shape
        raw: Iterator[tuple[int, ArrayLike]] = source.iter_chunks(chunk_rows, start, stop, reuse_buffer=True)
    else:
        n, d = int(source.shape[0]), int(source.shape[1])
        end = n if stop is None else min(stop, n)
        raw = ((first, source[first : min(first + chunk_rows, end)]) for first in range(start, end, chunk_rows))
    stop = n if stop is None else min(stop, n)
    flat = torch.empty(min(chunk_rows, max(stop - start, 0)) * d)
    for first, rows in raw:
        src = rows.detach().cpu() if isinstance(rows, torch.Tensor) else torch.from_numpy(np.asarray(rows))
        out = flat[: len(src) * d].view(len(src), d)
        out.copy_(src)
        if normalize:
            # In place, as F.normalize does it: x / max(||x||, eps).
            out.div_(torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min_(1e-12))
        yield first, out


def _prepare_queries(queries: ArrayLike, metric: Metric) -> torch.Tensor:
    q = torch.as_tensor(queries).detach().cpu().float()
    if q.ndim == 1:
        q = q[None, :]
    return F.normalize(q, dim=1) if metric == "cosine" else q


def merge_topk(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` best of candidate ``(m, c)`` scores and their indices, best first.

    Used between chunks, and by a caller that concatenates the top-k of several ranks.
    """
    k = min(k, scores.shape[1])
    best, pos = torch.topk(scores, k, dim=1)
    return best, torch.gather(indices, 1, pos)


def topk_similarity(
    source: FeatureStore | ArrayLike,
    queries: ArrayLike,
    k: int,
    *,
    chunk_rows: int = 16384,
    metric: Metric = "cosine",
    start: int = 0,
    stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` stored rows most similar to each query, streaming over the rows.

    Args:
        source: a :class:`FeatureStore` (read in chunks) or an in-memory ``(n, d)`` array.
        queries: ``(m, d)`` (or one ``(d,)`` query).
        k: neighbours per query; fewer are returned when the row range is shorter.
        chunk_rows: rows per read; peak memory is about ``chunk_rows * (d + m)`` floats.
        metric: ``"cosine"`` (rows and queries L2-normalised) or ``"dot"``.
        start: first row to score (one rank's share starts here).
        stop: one past the last row to score (default: the end).

    Returns:
        ``(scores, indices)``, both ``(m, min(k, rows))``: float32 similarities, best
        first, and the global row index of each.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = _prepare_queries(queries, metric)
    m = q.shape[0]
    best = torch.empty(m, 0)
    best_idx = torch.empty(m, 0, dtype=torch.long)
    n = source.shape[0]
    span = max((n if stop is None else min(stop, n)) - start, 0)
    sims_flat = torch.empty(m * min(chunk_rows, span))  # reused; a prefix view stays contiguous
    for first, rows in _chunks(source, chunk_rows, start, stop, normalize=metric == "cosine"):
        sims = torch.matmul(q, rows.T, out=sims_flat[: m * len(rows)].view(m, len(rows)))
        top, pos = torch.topk(sims, min(k, sims.shape[1]), dim=1)
        best, best_idx = merge_topk(torch.cat([best, top], 1), torch.cat([best_idx, pos + first], 1), k)
    return best, best_idx


def mean_similarity(
    source: FeatureStore | ArrayLike,
    queries: ArrayLike,
    *,
    chunk_rows: int = 16384,
    metric: Metric = "cosine",
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Each stored row's mean similarity to the queries (LESS's score), streaming.

    The mean of dot products with the queries equals the dot product with the queries'
    mean, so each chunk costs one matrix-vector product.

    Args:
        source: a :class:`FeatureStore` or an in-memory ``(n, d)`` array.
        queries: ``(m, d)`` (or one ``(d,)`` query).
        chunk_rows: rows per read.
        metric: ``"cosine"`` or ``"dot"``.
        start: first row to score.
        stop: one past the last row to score (default: the end).

    Returns:
        ``(stop - start,)`` float32 scores, row ``start`` first.
    """
    q_mean = _prepare_queries(queries, metric).mean(dim=0)
    n = source.shape[0]
    out = torch.empty(max((n if stop is None else min(stop, n)) - start, 0))
    for first, rows in _chunks(source, chunk_rows, start, stop, normalize=metric == "cosine"):
        torch.mv(rows, q_mean, out=out[first - start : first - start + len(rows)])
    return out
