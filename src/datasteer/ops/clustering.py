"""Clustering of embedding rows into groups: k-means, spherical k-means, k-center, LSH, random.

Every function takes an ``(n, d)`` float tensor (or only ``n``) and returns a ``(n,)``
long tensor of cluster labels, **compacted** to ``0..C-1`` in order of each cluster's
first member (so no label is empty and equal partitions give equal labels). ``C`` can be
smaller than the ``k`` asked for: k-means may leave a centroid without points, LSH fills
only the buckets its hyperplanes actually separate, and no method makes more clusters
than points.

Randomness comes only from the ``torch.Generator`` passed in (faiss gets a seed drawn
from it), so a fixed seed gives the same labels every time.

* ``kmeans`` / ``spherical``: Lloyd's algorithm through ``faiss.Kmeans`` (spherical: unit
  centroids, assignment by inner product, the usual choice for L2-normalised embeddings).
* ``kcenter``: greedy farthest-first traversal (Gonzalez, 1985; the k-center core set of
  Sener & Savarese, arXiv 1708.00489): start at a random point, repeatedly add the point
  farthest from every chosen center, then assign each point to its nearest center.
* ``lsh``: random-hyperplane LSH (Charikar, 2002): ``ceil(log2 k)`` Gaussian hyperplanes,
  a point's bucket is its sign pattern, so vectors with a small angle share a bucket.
* ``random``: a balanced random partition (cluster sizes differ by at most one).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import torch

ClusterMethod = Literal["kmeans", "spherical", "kcenter", "lsh", "random"]
CLUSTER_METHODS: tuple[str, ...] = get_args(ClusterMethod)

__all__ = [
    "CLUSTER_METHODS",
    "ClusterMethod",
    "cluster",
    "compact_labels",
    "kcenter",
    "kmeans",
    "lsh_buckets",
    "random_partition",
]


def compact_labels(labels: torch.Tensor) -> torch.Tensor:
    """Relabel to ``0..C-1`` in order of each label's first occurrence."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.numel() == 0:
        return labels.clone()
    values, inverse = torch.unique(labels, return_inverse=True)
    first = torch.full((len(values),), labels.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(labels.numel()), reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(len(values))
    return rank[inverse]


def _seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def kmeans(
    x: torch.Tensor, k: int, *, generator: torch.Generator, spherical: bool = False, niter: int = 20
) -> torch.Tensor:
    """Lloyd's k-means (``faiss.Kmeans``, seeded from ``generator``); labels of each row.

    Args:
        x: ``(n, d)`` rows.
        k: clusters wanted (clamped to ``n``).
        generator: source of faiss's seed.
        spherical: unit-norm centroids and inner-product assignment (for normalised rows).
        niter: Lloyd iterations.
    """
    import faiss  # imported here: faiss is only needed when k-means runs

    data = np.ascontiguousarray(x.detach().cpu().float().numpy())
    n, d = data.shape
    k = max(1, min(k, n))
    seed = _seed(generator)
    # min_points_per_centroid=1: small pools are legitimate here; faiss would only warn.
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=spherical, verbose=False, min_points_per_centroid=1)
    km.train(data)
    _, assign = km.index.search(data, 1)
    return compact_labels(torch.from_numpy(assign[:, 0].astype(np.int64)))


def kcenter(x: torch.Tensor, k: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-center (farthest-first traversal) in Euclidean distance.

    The first center is drawn from ``generator``; each next one is the point farthest
    from its nearest chosen center (the lowest index among ties). Each point then joins
    its nearest center (the earliest chosen among ties).

    Returns:
        ``(centers, labels)``: the chosen row indices in the order chosen, and each row's
        compacted cluster label.
    """
    x = x.detach().cpu().float()
    n = len(x)
    k = max(1, min(k, n))
    centers = [int(torch.randint(0, n, (1,), generator=generator))]
    nearest = torch.cdist(x, x[centers[0]][None]).flatten()
    labels = torch.zeros(n, dtype=torch.long)
    for j in range(1, k):
        far = int(torch.argmax(nearest))  # argmax returns the first maximum: ties go to the lowest index
        if nearest[far] <= 0:  # every point coincides with a center: more centers add nothing
            break
        centers.append(far)
        dist = torch.cdist(x, x[far][None]).flatten()
        closer = dist < nearest  # strict: a tie stays with the earlier center
        labels[closer] = j
        nearest = torch.minimum(nearest, dist)
    return torch.tensor(centers, dtype=torch.long), compact_labels(labels)


def lsh_buckets(x: torch.Tensor, k: int, *, generator: torch.Generator) -> torch.Tensor:
    """Random-hyperplane LSH: the sign pattern of ``ceil(log2 k)`` Gaussian projections.

    At most ``2^ceil(log2 k)`` buckets (fewer when the data occupy fewer sign patterns).
    """
    x = x.detach().cpu().float()
    bits = max(1, math.ceil(math.log2(max(k, 2))))
    planes = torch.randn(x.shape[1], bits, generator=generator)
    signs = (x @ planes > 0).long()
    codes = (signs * (2 ** torch.arange(bits))).sum(dim=1)
    return compact_labels(codes)


def random_partition(n: int, k: int, *, generator: torch.Generator) -> torch.Tensor:
    """A balanced random partition of ``n`` rows into ``min(k, n)`` clusters."""
    k = max(1, min(k, n))
    labels = torch.empty(n, dtype=torch.long)
    labels[torch.randperm(n, generator=generator)] = torch.arange(n) % k
    return compact_labels(labels)


def cluster(
    x: torch.Tensor, k: int, method: ClusterMethod, *, generator: torch.Generator, niter: int = 20
) -> torch.Tensor:
    """Labels of each row of ``x`` under ``method`` (see the module docstring)."""
    if method in ("kmeans", "spherical"):
        return kmeans(x, k, generator=generator, spherical=method == "spherical", niter=niter)
    if method == "kcenter":
        return kcenter(x, k, generator=generator)[1]
    if method == "lsh":
        return lsh_buckets(x, k, generator=generator)
    if method == "random":
        return random_partition(len(x), k, generator=generator)
    raise ValueError(f"unknown clustering method {method!r}; choose one of {', '.join(CLUSTER_METHODS)}")
