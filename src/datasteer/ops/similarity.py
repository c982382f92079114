"""Cosine similarity between pool features and query features, in row chunks.

NEAR keeps each target's nearest pool rows (:func:`topk_similarity`); LESS scores each pool
row by its mean cosine with the targets (:func:`mean_similarity`). Both normalise and score
the pool ``chunk_rows`` rows at a time in float32 on the CPU, so neither a normalised copy
of the whole pool nor the whole ``(queries, pool)`` similarity matrix is ever held.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = np.ndarray | torch.Tensor

__all__ = ["mean_similarity", "topk_similarity"]


def _normalized_chunks(pool: ArrayLike, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, rows)``: float32, L2-normalised chunks of ``pool``.

    Every chunk is a view of one reused buffer (consume it before the next one).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n, d = int(pool.shape[0]), int(pool.shape[1])
    flat = torch.empty(min(chunk_rows, n) * d)
    for first in range(0, n, chunk_rows):
        rows = pool[first : first + chunk_rows]
        src = rows.detach().cpu() if isinstance(rows, torch.Tensor) else torch.from_numpy(np.asarray(rows))
        out = flat[: len(src) * d].view(len(src), d)
        out.copy_(src)
        # In place, as F.normalize does it: x / max(||x||, eps).
        out.div_(torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min_(1e-12))
        yield first, out


def _normalized_queries(queries: ArrayLike) -> torch.Tensor:
    q = torch.as_tensor(queries).detach().cpu().float()
    if q.ndim == 1:
        q = q[None, :]
    return F.normalize(q, dim=1)


def topk_similarity(
    pool: ArrayLike, queries: ArrayLike, k: int, *, chunk_rows: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` pool rows of highest cosine similarity to each query.

    Args:
        pool: ``(n, d)`` features.
        queries: ``(m, d)`` (or one ``(d,)`` query).
        k: neighbours per query; all ``n`` rows when ``k > n``.
        chunk_rows: pool rows scored at a time; extra memory is about
            ``chunk_rows * (d + m)`` floats.

    Returns:
        ``(scores, indices)``, both ``(m, min(k, n))``: float32 cosines, best first, and
        the pool row of each.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = _normalized_queries(queries)
    m = q.shape[0]
    best = torch.empty(m, 0)
    best_idx = torch.empty(m, 0, dtype=torch.long)
    sims_flat = torch.empty(m * min(chunk_rows, int(pool.shape[0])))  # reused; a prefix view stays contiguous
    for first, rows in _normalized_chunks(pool, chunk_rows):
        sims = torch.matmul(q, rows.T, out=sims_flat[: m * len(rows)].view(m, len(rows)))
        top, pos = torch.topk(sims, min(k, sims.shape[1]), dim=1)
        # Keep the k best of the previous best and this chunk's best.
        scores, indices = torch.cat([best, top], 1), torch.cat([best_idx, pos + first], 1)
        best, keep = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        best_idx = torch.gather(indices, 1, keep)
    return best, best_idx


def mean_similarity(pool: ArrayLike, queries: ArrayLike, *, chunk_rows: int = 16384) -> torch.Tensor:
    """Each pool row's mean cosine similarity to the queries (LESS's score).

    The mean of the cosines equals the dot product of the normalised row with the mean of
    the normalised queries, so each chunk costs one matrix-vector product.

    Args:
        pool: ``(n, d)`` features.
        queries: ``(m, d)`` (or one ``(d,)`` query).
        chunk_rows: pool rows scored at a time.

    Returns:
        ``(n,)`` float32 scores.
    """
    q_mean = _normalized_queries(queries).mean(dim=0)
    out = torch.empty(int(pool.shape[0]))
    for first, rows in _normalized_chunks(pool, chunk_rows):
        torch.mv(rows, q_mean, out=out[first : first + len(rows)])
    return out
