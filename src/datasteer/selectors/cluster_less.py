"""Cluster-LESS: LESS scores computed for a few representatives per cluster, inherited by every member."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from datasteer.config import doc
from datasteer.errors import ConfigError, NonFiniteInputError
from datasteer.finite import finite_rows
from datasteer.ops.clustering import CLUSTER_METHODS, ClusterMethod, cluster
from datasteer.ops.embeddings import Pooling
from datasteer.registry import SELECTORS
from datasteer.selectors.base import SelectContext, Selector, refuse_streams
from datasteer.selectors.less import GradientFeatureParams, finite_scores, target_gradient_features

logger = logging.getLogger(__name__)

Pick = Literal["random", "nearest", "farthest", "mixed"]


@dataclass
class ClusterLessParams(GradientFeatureParams):
    """Parameters of :class:`ClusterLessSelector`."""

    cluster_size: int = doc("Average members per cluster: the pool of N makes k = ceil(N / cluster_size).", default=16)
    clustering: ClusterMethod = doc(
        "How the pool is clustered once, on embeddings: kmeans, spherical (k-means on the unit sphere), "
        "kcenter (greedy farthest-first), lsh (random hyperplanes) or random.",
        default="spherical",
    )
    niter: int = doc("Lloyd iterations of kmeans / spherical.", default=20)
    representatives: int = doc("Members per cluster whose gradients are computed at each update.", default=2)
    pick: Pick = doc(
        "Which members represent a cluster: random (fresh each update), nearest or farthest from the "
        "cluster's mean embedding, or mixed (half nearest, half farthest).",
        default="nearest",
    )
    pooling: Pooling = doc("How hidden states are pooled into the clustering embedding.", default="mean")
    layer: int = doc("Hidden layer embedded for clustering (-1: the last).", default=-1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cluster_size < 1:
            raise ConfigError(f"cluster_size: must be >= 1, got {self.cluster_size}")
        if self.clustering not in CLUSTER_METHODS:
            raise ConfigError(f"clustering: {self.clustering!r} is not allowed; choose one of {CLUSTER_METHODS}")
        if self.niter < 1:
            raise ConfigError(f"niter: must be >= 1, got {self.niter}")
        if self.representatives < 1:
            raise ConfigError(f"representatives: must be >= 1, got {self.representatives}")


def order_by_centrality(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pool indices grouped by cluster (label 0 first), each cluster's members from the most
    to the least similar to the cluster's mean embedding (dot product; ties: lower index first)."""
    k = int(labels.max()) + 1
    sums = torch.zeros(k, embeddings.shape[1]).index_add_(0, labels, embeddings.float())
    centroids = sums / torch.bincount(labels, minlength=k).clamp_min(1)[:, None]
    closeness = (embeddings.float() * centroids[labels]).sum(dim=1)
    by_closeness = torch.sort(-closeness, stable=True).indices
    return by_closeness[torch.sort(labels[by_closeness], stable=True).indices]


def pick_representatives(
    order: torch.Tensor, labels: torch.Tensor, count: int, pick: Pick, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` representatives of every cluster; ``(indices, their cluster labels)``.

    ``order`` is :func:`order_by_centrality`'s grouping. ``mixed`` takes the ``ceil(r/2)``
    nearest and the ``floor(r/2)`` farthest members; ``random`` draws from ``generator``.
    """
    sizes = torch.bincount(labels).tolist()
    chosen: list[torch.Tensor] = []
    start = 0
    for size in sizes:
        members = order[start : start + size]
        start += size
        r = min(count, size)
        if pick == "nearest":
            part = members[:r]
        elif pick == "farthest":
            part = members[size - r :]
        elif pick == "mixed":
            part = torch.cat([members[: math.ceil(r / 2)], members[size - r // 2 :]])
        else:
            part = members[torch.randperm(size, generator=generator)[:r]]
        chosen.append(part)
    indices = torch.cat(chosen)
    return indices, labels[indices]


def cluster_features(features: torch.Tensor, rep_labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """Each cluster's feature: the mean of its representatives' normalised features, renormalised."""
    unit = F.normalize(features.float(), dim=1)
    sums = torch.zeros(clusters, unit.shape[1]).index_add_(0, rep_labels, unit)
    return F.normalize(sums, dim=1)


def rank_by_cluster_score(
    scores: torch.Tensor, labels: torch.Tensor, count: int, generator: torch.Generator
) -> torch.Tensor:
    """The first ``count`` pool indices ordered by their cluster's score (highest first),
    then by cluster label (ties between clusters), then in a seeded random order within a cluster.

    So whole clusters fill the selection in score order, and only the last one taken is cut,
    at random members.
    """
    order = torch.randperm(len(labels), generator=generator)
    order = order[torch.sort(labels[order], stable=True).indices]
    order = order[torch.sort(-scores[labels[order]], stable=True).indices]
    return order[:count]


@SELECTORS.register("cluster_less")
class ClusterLessSelector(Selector):
    """Cluster-LESS: cluster the pool once, score each cluster by LESS (arXiv 2402.04333) on a few representatives.

    At the first update the pool is embedded with the live model (pooled hidden states,
    L2-normalised) and clustered once into ``k = ceil(N / cluster_size)`` clusters
    (:mod:`datasteer.ops.clustering`); the assignment is kept for the run. At every
    update, the LESS features (Adam-preconditioned projected gradients, as in
    :class:`~datasteer.selectors.less.LessSelector`) of ``representatives`` members per
    cluster are computed; a cluster's feature is the renormalised mean of its
    representatives' unit features and its score the mean cosine with each target set's
    gradient features, maximised over target sets. Every member inherits its cluster's
    score. The selection takes whole clusters in score order (ties: lower cluster label
    first), members in a seeded random order, cutting the last cluster. Gradients cost
    about ``representatives / cluster_size`` of LESS's.

    Non-finite rows are left out of the scoring (and counted, ``nonfinite``): pool samples
    whose clustering embedding is not finite form one cluster of their own that always
    ranks last; a representative whose gradient feature is not finite does not enter its
    cluster's feature, and a cluster without a finite representative ranks last.
    """

    Params = ClusterLessParams
    needs_model = True

    def check_streams(self) -> None:
        raise refuse_streams("cluster_less", "it clusters the whole pool once, and a stream is never held whole")

    def __init__(self, params: ClusterLessParams) -> None:
        super().__init__(params)
        self.labels: torch.Tensor | None = None  # (pool,) cluster of each pool sample
        self.order: torch.Tensor | None = None  # (pool,) grouped by cluster, nearest to the centroid first
        # The cluster of the samples whose embedding is not finite (always the last label).
        self.left_out: int | None = None
        self._report: dict[str, int | float] = {}

    def report(self) -> dict[str, int | float]:
        """``nonfinite``: pool embeddings (when clustering) and feature rows left out of the latest update."""
        return dict(self._report)

    def _cluster(self, ctx: SelectContext) -> None:
        assert ctx.ops is not None
        p: ClusterLessParams = self.params
        embeddings = ctx.ops.embeddings(torch.arange(ctx.pool_size), layer=p.layer, pooling=p.pooling)
        finite = finite_rows(embeddings)
        self._report["nonfinite"] = int((~finite).sum())
        if not bool(finite.any()):
            raise NonFiniteInputError(f"no pool embedding is finite ({ctx.pool_size} are NaN or infinite)")
        k = math.ceil(int(finite.sum()) / p.cluster_size)
        labels = torch.empty(ctx.pool_size, dtype=torch.long)
        labels[finite] = cluster(embeddings[finite], k, p.clustering, generator=ctx.generator, niter=p.niter)
        self.left_out = None
        if not bool(finite.all()):
            self.left_out = int(labels[finite].max()) + 1
            labels[~finite] = self.left_out
            logger.warning("cluster_less: %d pool embeddings are NaN or infinite; they rank last", int((~finite).sum()))
        self.labels = labels
        # (the left-out rows' order within their own cluster does not matter: zeros keep NaN out)
        self.order = order_by_centrality(torch.where(finite[:, None], embeddings, 0.0), labels)
        logger.info("cluster_less: %d pool samples in %d clusters (%s)", ctx.pool_size, self.clusters, p.clustering)

    @property
    def clusters(self) -> int:
        """Number of clusters (0 before the pool is clustered)."""
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def cluster_scores(self, ctx: SelectContext) -> torch.Tensor:
        """``(clusters,)`` LESS score of every cluster under the live model (clusters the pool if needed)."""
        p: ClusterLessParams = self.params
        ops = ctx.ops
        assert ops is not None
        config = p.feature_config()
        targets = target_gradient_features(ops, config, "cluster_less")
        self._report = {"nonfinite": 0}
        if self.labels is None or self.order is None:
            self._cluster(ctx)
        assert self.labels is not None and self.order is not None
        reps, rep_labels = pick_representatives(self.order, self.labels, p.representatives, p.pick, ctx.generator)
        if self.left_out is not None:  # no gradients for the samples left out of the clustering
            reps, rep_labels = reps[rep_labels != self.left_out], rep_labels[rep_labels != self.left_out]
        features = ops.gradient_features(reps, config, optimizer=ops.optimizer if p.adam else None)
        finite = finite_rows(features)
        features, rep_labels = features[finite], rep_labels[finite]
        scores, left_out = finite_scores(cluster_features(features, rep_labels, self.clusters), targets)
        self._report["nonfinite"] += left_out + int((~finite).sum())
        if scores is None or len(rep_labels) == 0:
            raise NonFiniteInputError("no finite gradient feature to score by")
        # a cluster without a finite representative (the left-out one included) ranks last
        scored = torch.bincount(rep_labels, minlength=self.clusters) > 0
        return torch.where(scored, scores, -math.inf)

    def select(self, ctx: SelectContext) -> torch.Tensor:
        scores = self.cluster_scores(ctx)
        assert self.labels is not None
        return rank_by_cluster_score(scores, self.labels, min(ctx.num_samples, ctx.pool_size), ctx.generator)

    def state_dict(self) -> dict[str, Any]:
        labels = self.labels
        if labels is not None and self.left_out is not None:  # saved as label -1
            labels = torch.where(labels == self.left_out, -1, labels)
        return {"labels": labels, "order": self.order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        labels, self.order = state["labels"], state["order"]
        self.left_out = None
        if labels is not None and bool((labels < 0).any()):
            self.left_out = int(labels.max()) + 1
            labels = torch.where(labels < 0, self.left_out, labels)
        self.labels = labels
