"""Pool features on disk: each rank's share of an ``(n, k)`` float32 matrix, read in row chunks.

A LESS selection over 1M samples at ``proj_dim`` 8192 holds 32 GB of features, so pool
features are not gathered onto every rank. Each rank writes the rows of its own
contiguous share (:func:`datasteer.dist.shard_bounds`) to a file as they are computed,
and scores them a chunk at a time through a numpy memmap of that chunk only: the scoring
of a row needs only the row and the small target features, which every rank holds. What
is gathered is one score per row (:meth:`FeatureStore.row_scores`) or each query's local
top-k candidates (:meth:`FeatureStore.topk_similarity`). Peak memory is one chunk
(``chunk_bytes``), whatever the pool size. The file lives in a temporary directory that
:meth:`FeatureStore.close` (or leaving a ``with`` block) removes.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from datasteer import dist
from datasteer.finite import finite_rows
from datasteer.ops.similarity import ArrayLike, topk_similarity

__all__ = ["DEFAULT_CHUNK_BYTES", "FeatureStore"]

#: Bytes of features read (and scored) at a time: 2048 rows at width 8192.
DEFAULT_CHUNK_BYTES = 64 << 20

_ITEM = np.dtype(np.float32).itemsize


class FeatureStore:
    """This rank's contiguous rows of an ``(n, width)`` float32 feature matrix, in a temporary file.

    Rows are appended in order as they are computed (:meth:`append`); the width is set by
    the first append (which may hold no row). Reading and scoring go chunk by chunk.

    Args:
        total: ``n``, the rows of the whole matrix over all ranks.
        directory: where the temporary directory is made (``None``: the system's default,
            see :func:`tempfile.mkdtemp`).
        chunk_bytes: bytes of rows read at a time (at least one row).
        order: the rows of this rank's share in the order they are appended: the ``i``-th
            row appended is row ``start + order[i]`` (``None``: in row order). What is read
            back (scores, top-k indices, the matrix) is in row order.

    Attributes:
        total: rows over all ranks.
        start: the first (global) row of this rank's share.
        stop: one past its last row.
    """

    def __init__(
        self,
        total: int,
        *,
        directory: str | os.PathLike[str] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        order: Sequence[int] | None = None,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.total = total
        self.start, self.stop = dist.shard_bounds(total)
        self._order = None if order is None else torch.as_tensor(order, dtype=torch.long)
        if self._order is not None and not torch.equal(self._order.sort().values, torch.arange(self.stop - self.start)):
            raise ValueError(f"order must be a permutation of this rank's {self.stop - self.start} rows")
        self.chunk_bytes = chunk_bytes
        self._width: int | None = None
        self._written = 0
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix="datasteer-features-", dir=directory))
        self._path = self._dir / f"rank{dist.rank()}.f32"
        self._file: IO[bytes] | None = self._path.open("wb")
        # Removes the directory even if the store is dropped without close().
        self._cleanup = weakref.finalize(self, _remove, self._file, self._dir)

    @classmethod
    def from_tensor(
        cls, rows: ArrayLike, *, directory: str | os.PathLike[str] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> FeatureStore:
        """A store holding this rank's share of the whole ``(n, width)`` matrix ``rows``."""
        store = cls(int(rows.shape[0]), directory=directory, chunk_bytes=chunk_bytes)
        step = store.chunk_rows_for(int(rows.shape[1]))
        for first in range(store.start, store.stop, step):
            store.append(torch.as_tensor(rows[first : min(first + step, store.stop)]))
        if store.start == store.stop:
            store.append(torch.empty(0, int(rows.shape[1])))
        return store

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        """The file of this rank's rows."""
        return self._path

    @property
    def width(self) -> int:
        """Features per row.

        Raises:
            ValueError: nothing was appended yet.
        """
        if self._width is None:
            raise ValueError("the feature store has no width yet: append rows (or an empty (0, width) block) first")
        return self._width

    @property
    def rows(self) -> int:
        """Rows of this rank written so far."""
        return self._written

    def chunk_rows_for(self, width: int) -> int:
        """Rows of ``width`` features that fit in ``chunk_bytes`` (at least 1)."""
        return max(1, self.chunk_bytes // (max(1, width) * _ITEM))

    def append(self, rows: torch.Tensor) -> None:
        """Write the next ``(r, width)`` rows of this rank's share (``r`` may be 0).

        Raises:
            ValueError: the width differs from earlier rows, the share would overflow, or
                the store is closed.
        """
        if rows.ndim != 2:
            raise ValueError(f"rows must be (r, width), got shape {tuple(rows.shape)}")
        if self._file is None:
            raise ValueError("the feature store is closed or already read; rows can no longer be appended")
        if self._width is not None and rows.shape[1] != self._width:
            raise ValueError(f"rows of width {rows.shape[1]} appended to a store of width {self._width}")
        if self._written + rows.shape[0] > self.stop - self.start:
            raise ValueError(f"this rank's share holds {self.stop - self.start} rows; got more")
        self._width = int(rows.shape[1])
        rows.detach().to("cpu", torch.float32).contiguous().numpy().tofile(self._file)
        self._written += int(rows.shape[0])

    def _finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._written != self.stop - self.start:
            raise ValueError(f"this rank's share has {self.stop - self.start} rows; {self._written} were written")

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first global row, rows)`` of this rank's share, ``chunk_bytes`` at a time.

        Each chunk is a copy-on-write memmap of its rows only (writable, never written
        back), unmapped once the next one is asked for; do not keep it.
        """
        self._finish()
        width = self.width
        step = self.chunk_rows_for(width)
        for first in range(0, self._written, step):
            count = min(step, self._written - first)
            chunk = np.memmap(
                self._path, dtype=np.float32, mode="c", offset=first * width * _ITEM, shape=(count, width)
            )
            yield self.start + first, chunk
            del chunk

    def row_scores(self, score: Callable[[np.ndarray], torch.Tensor]) -> torch.Tensor:
        """``score`` of every row, ``(n,)``, in row order, the same on every rank.

        Args:
            score: maps an ``(r, width)`` chunk to ``(r,)`` values of its rows (row-wise: a
                row's value must not depend on the other rows of its chunk).
        """
        parts = [score(chunk).reshape(-1) for _, chunk in self.chunks()]
        local = torch.cat(parts) if parts else torch.empty(0)
        return dist.gather_rows(self._in_row_order(local), self.total)

    def topk_similarity(self, queries: ArrayLike, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` rows of highest cosine similarity to each query (see
        :func:`datasteer.ops.similarity.topk_similarity`), over all ranks' rows.

        Each rank keeps its own rows' best ``k`` per query, chunk by chunk; the candidates
        are gathered and merged, so only ``(queries, k)`` per rank travels. A row that is
        not finite scores ``-inf`` (listed last, and only when fewer than ``k`` rows are
        finite).

        Returns:
            ``(scores, indices)``, both ``(m, min(k, n))``, best first; global row indices.
        """
        best, best_idx = torch.empty(0), torch.empty(0, dtype=torch.long)
        for first, chunk in self.chunks():
            rows = torch.from_numpy(chunk)
            bad = ~finite_rows(rows)
            if bool(bad.any()):  # such a row is listed only when fewer than k rows are finite
                rows[bad] = 0.0
            top, idx = topk_similarity(rows, queries, k + int(bad.sum()), chunk_rows=len(rows))
            top[bad[idx]] = -math.inf
            best, best_idx = _merge_topk(best, best_idx, top, self._row_of(idx + first), k)
        if self._written == 0:  # no row here: no candidate, of the queries' count
            m = 1 if torch.as_tensor(queries).ndim == 1 else int(queries.shape[0])
            best, best_idx = torch.empty(m, 0), torch.empty(m, 0, dtype=torch.long)
        if not dist.is_distributed():
            return best, best_idx
        # Candidates travel as (candidates, queries) rows: ranks may hold different counts.
        scores, _ = dist.all_gather_rows(best.T.contiguous())
        indices, _ = dist.all_gather_rows(best_idx.T.contiguous())
        return _merge_topk(torch.empty(0), torch.empty(0, dtype=torch.long), scores.T, indices.T, k)

    def to_tensor(self) -> torch.Tensor:
        """The whole ``(n, width)`` matrix on every rank (gathered; for small sets only)."""
        parts = [torch.from_numpy(np.array(chunk)) for _, chunk in self.chunks()]
        local = torch.cat(parts) if parts else torch.empty(0, self.width)
        return dist.gather_rows(self._in_row_order(local), self.total)

    def _in_row_order(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's values, one per appended row, put in row order."""
        if self._order is None:
            return local
        out = torch.empty_like(local)
        out[self._order] = local
        return out

    def _row_of(self, positions: torch.Tensor) -> torch.Tensor:
        """The global rows of appended rows at (global) write positions ``positions``."""
        return positions if self._order is None else self.start + self._order[positions - self.start]

    def close(self) -> None:
        """Delete the file and its directory (idempotent)."""
        self._file = None
        self._cleanup()


def _merge_topk(
    best: torch.Tensor, best_idx: torch.Tensor, top: torch.Tensor, idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of two ``(m, .)`` candidate sets (the first may be empty)."""
    if best.numel() == 0:
        best, best_idx = top[:, :0], idx[:, :0]
    scores, indices = torch.cat([best, top], 1), torch.cat([best_idx, idx], 1)
    out, keep = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return out, torch.gather(indices, 1, keep)


def _remove(file: Any, directory: Path) -> None:
    if file is not None:
        file.close()
    shutil.rmtree(directory, ignore_errors=True)
