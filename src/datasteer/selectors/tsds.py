"""TSDS: draw pool samples from probabilities prepared offline by optimal-transport alignment."""

from __future__ import annotations

import hashlib
import heapq
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from datasteer.config import doc
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.ops.prepared import embedding_settings, pool_fingerprint, read_prepared, row_token_ids
from datasteer.registry import SELECTORS
from datasteer.selectors.base import SelectContext, Selector, refuse_streams

logger = logging.getLogger(__name__)


@dataclass
class TsdsParams:
    """Parameters of :class:`TsdsSelector` (all but ``prepared`` are preparation settings)."""

    prepared: str = doc("Directory written by `datasteer prepare tsds CONFIG` (required).")
    neighbours: int = doc("Nearest pool samples retrieved per target (the paper's K).", default=256)
    kde_neighbours: int = doc("Pool neighbours of a candidate counted in its kernel density.", default=64)
    alpha: float = doc("Trade-off in (0, 1): alignment (alpha) vs diversity (1 - alpha).", default=0.6)
    C: float = doc("Scale of the transport cost (same scale as embedding distances).", default=5.0)
    sigma: float = doc("Kernel radius of the density estimate in embedding distance (0: no KDE).", default=0.75)
    encoder: str | None = doc("Local sentence-encoder directory (null: the training model).", default=None)
    layer: int = doc("Hidden layer of the training model to embed with (-1: the last).", default=-1)
    pooling: Literal["mean", "last", "weighted"] = doc("How hidden states are pooled.", default="mean")
    index: Literal["flat", "ivf"] = doc("faiss index: exact inner product, or IVF for large pools.", default="flat")
    ivf_lists: int = doc("IVF lists (0: about sqrt(pool size)).", default=0)
    ivf_probe: int = doc("IVF lists searched per query.", default=8)

    def __post_init__(self) -> None:
        if not str(self.prepared).strip():
            raise ConfigError("prepared: give the directory written by `datasteer prepare tsds CONFIG`")
        for key in ("neighbours", "kde_neighbours", "ivf_probe"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha: must lie in (0, 1), got {self.alpha}")
        if self.C <= 0:
            raise ConfigError(f"C: must be > 0, got {self.C}")
        if self.sigma < 0:
            raise ConfigError(f"sigma: must be >= 0, got {self.sigma}")
        if self.ivf_lists < 0:
            raise ConfigError(f"ivf_lists: must be >= 0, got {self.ivf_lists}")

    def settings(self) -> dict[str, object]:
        """What the prepared probabilities depend on (part of their fingerprint)."""
        keys = ("neighbours", "kde_neighbours", "alpha", "C", "sigma", "encoder", "layer", "pooling")
        out: dict[str, object] = {"kind": "tsds", **{k: getattr(self, k) for k in keys}}
        out["index"] = self.index if self.index == "flat" else f"ivf:{self.ivf_lists}:{self.ivf_probe}"
        return out


def kernel_density(squared_distances: np.ndarray, sigma: float) -> np.ndarray:
    """Epanechnikov-style density ``sum_j max(0, 1 - d_j^2 / sigma^2)`` of each row's neighbours.

    Args:
        squared_distances: ``(n, k)`` squared distances from each point to its neighbours
            (the point itself included, so every density is >= 1); ``inf`` marks a missing one.
        sigma: kernel radius; 0 turns the density off (every point counts 1).
    """
    d2 = np.asarray(squared_distances, dtype=np.float64)
    if sigma == 0:
        return np.ones(d2.shape[0])
    return np.clip(1.0 - d2 / sigma**2, 0.0, None).sum(axis=1)


def tsds_probabilities(
    neighbours: np.ndarray, distances: np.ndarray, density: np.ndarray, pool_size: int, *, alpha: float, C: float
) -> np.ndarray:
    """Sampling probability of every pool sample: the KDE-regularised optimal transport plan.

    Each of the M targets carries mass 1/M and sends it to its nearest candidates. At a
    level ``s`` a target's j-th neighbour (by distance) receives at most ``1 / (M s rho_j)``;
    the target fills its neighbours in order and the first one that is not full takes the
    rest. Raising ``s`` spreads mass over more neighbours (more diverse, costlier
    transport). The objective ``(alpha / C) transport + (1 - alpha) / s`` has derivative
    ``((alpha / C) sum_i g_i / M - (1 - alpha)) / s^2``, where ``g_i = d_{i,K+1} A_i(K) -
    B_i(K)`` for a target filled up to neighbour K (``A = sum 1/rho``, ``B = sum d/rho`` over
    neighbours 0..K) only changes at the breakpoints ``s = A_i(k)`` and never decreases.
    So the optimum is the first breakpoint, in increasing order, where
    ``(alpha / C) sum_i g_i >= (1 - alpha) M`` (greedy water-filling over a heap).

    Args:
        neighbours: ``(M, K)`` pool indices, nearest first; ``-1`` pads a short list.
        distances: ``(M, K)`` non-decreasing transport costs (embedding distances).
        density: ``(M, K)`` kernel density of each listed candidate (> 0).
        pool_size: N; the result has one entry per pool sample.
        alpha: trade-off in (0, 1) between alignment and diversity.
        C: scale of the transport cost.

    Returns:
        ``(N,)`` float64 probabilities summing to 1 (0 outside the neighbour lists).
    """
    ids = np.asarray(neighbours, dtype=np.int64)
    valid = ids >= 0
    lengths = valid.sum(axis=1)
    keep = lengths > 0
    if not keep.any():
        raise ValueError("no target has any neighbour")
    if not keep.all():
        logger.warning("tsds: %d targets have no neighbour and are left out", int((~keep).sum()))
    # Padding (-1) is dropped, never used as an index (numpy would read it as the last row).
    rows = [ids[i][valid[i]] for i in np.flatnonzero(keep)]
    dist = [np.asarray(distances, dtype=np.float64)[i][valid[i]] for i in np.flatnonzero(keep)]
    inv = [1.0 / np.asarray(density, dtype=np.float64)[i][valid[i]] for i in np.flatnonzero(keep)]
    m = len(rows)
    a = [np.cumsum(w) for w in inv]  # A_i(k)
    b = [np.cumsum(d * w) for d, w in zip(dist, inv, strict=True)]  # B_i(k)
    stage = np.full(m, -1)  # last neighbour filled to its cap (-1: none)
    gain = np.zeros(m)  # g_i at the current stage
    heap = [(float(a[i][0]), 0, i) for i in range(m) if len(rows[i]) > 1]
    heapq.heapify(heap)
    level = 0.0
    threshold = (1.0 - alpha) * m
    while heap:
        level, k, i = heapq.heappop(heap)
        total = gain.sum() - gain[i] + (dist[i][k + 1] * a[i][k] - b[i][k])
        if alpha / C * total >= threshold:
            break  # the optimum: target i's neighbour k is exactly full at this level
        gain[i] = dist[i][k + 1] * a[i][k] - b[i][k]
        stage[i] = k
        if k + 2 < len(rows[i]):
            heapq.heappush(heap, (float(a[i][k + 1]), k + 1, i))
    else:  # no break: every list was used up before the optimum
        if stage.max() >= 0:
            logger.info("tsds: the neighbour lists end before the optimum; raise `neighbours` to spread further")
    probs = np.zeros(pool_size)
    for i in range(m):
        k = int(stage[i])
        if k >= 0:
            np.add.at(probs, rows[i][: k + 1], inv[i][: k + 1] / (m * level))
        rest = 1.0 / m - (a[i][k] / (m * level) if k >= 0 else 0.0)
        probs[rows[i][k + 1]] += max(rest, 0.0)
    return probs / probs.sum()


def draw(probabilities: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` pool indices drawn from ``probabilities`` with ``generator``.

    Without replacement while the support (non-zero entries) allows; when ``n`` exceeds it,
    the whole support is taken and the rest is drawn with replacement.
    """
    support = int((probabilities > 0).sum())
    if n <= support:
        return torch.multinomial(probabilities, n, replacement=False, generator=generator)
    logger.info("tsds: %d samples asked, %d have non-zero probability; %d drawn again", n, support, n - support)
    whole = torch.nonzero(probabilities > 0).flatten()
    whole = whole[torch.randperm(len(whole), generator=generator)]
    extra = torch.multinomial(probabilities, n - support, replacement=True, generator=generator)
    return torch.cat([whole, extra])


@SELECTORS.register("tsds")
class TsdsSelector(Selector):
    """TSDS: draw each update's samples from optimal-transport probabilities prepared offline (arXiv 2410.11303).

    Reading of the paper (Liu, Karbasi, Rekatsinas, NeurIPS 2024): the selection is a
    probability mass p over the N candidates, the column sums of a transport plan that
    moves each of the M targets' mass 1/M to candidates at cost ``d(q_i, x_j)``. The
    objective is ``(alpha / C) <plan, cost> + (1 - alpha) G_KDE``, where the diversity
    regulariser penalises mass on a candidate relative to ``1 / rho_j``, its kernel density
    ``rho_j = sum max(0, 1 - d^2 / sigma^2)`` over its nearest candidates: near-duplicates
    share one candidate's worth of mass. Its solution (see :func:`tsds_probabilities`) fills
    each target's nearest neighbours with at most ``1 / (M s rho_j)`` each, for the level
    ``s`` found by greedy water-filling. Distances are Euclidean between L2-normalised
    embeddings (so ``d^2 = 2 - 2 cos``), retrieved with faiss by ``datasteer prepare tsds``.

    Online, each update draws ``ctx.num_samples`` indices with ``ctx.generator``
    (identical on all ranks), without replacement while the support allows; asking for
    more than the support takes all of it and draws the rest with replacement (the
    reference crashes). Unlike the reference, faiss's ``-1`` padding is dropped (not read
    as the last candidate) and nothing uses global RNG. The prepared file is checked
    against a fingerprint of this run's pool rows, target rows and the settings above.
    """

    Params = TsdsParams

    def check_within_domains(self) -> None:
        raise ConfigError(
            "datasteer.select: tsds draws from probabilities prepared over the whole pool and cannot choose "
            "within a mixer's domains; use it without a mix stage"
        )

    def check_streams(self) -> None:
        raise refuse_streams(
            "tsds", "it draws from probabilities prepared over the whole pool, and a stream is never held whole"
        )

    # The model is not run: the pool and target rows are read to check the fingerprint.
    needs_model = True

    def __init__(self, params: TsdsParams) -> None:
        super().__init__(params)
        self.probabilities: torch.Tensor | None = None
        self.expected_digest: str | None = None  # from a checkpoint: the file must not change

    def _load(self, ctx: SelectContext) -> torch.Tensor:
        if ctx.ops is None:
            raise SteeringStateError("tsds reads the pool rows to check its prepared file; no model ops were given")
        if not ctx.ops.targets:
            raise SteeringStateError("tsds needs target samples: give the run an evaluation set")
        expected = pool_fingerprint(
            pool_ids=row_token_ids(ctx.ops.dataset),
            domains=ctx.domains,
            domain_names=ctx.domain_names,
            target_ids=[row_token_ids(t.dataset) for t in ctx.ops.targets],
            settings=embedding_settings(self.params.settings(), ctx.ops.model),
        )
        probs = read_prepared(self.params.prepared, "tsds", expected)["probabilities"].double()
        if probs.shape != (ctx.pool_size,) or not torch.isfinite(probs).all() or (probs < 0).any():
            raise SteeringStateError(f"{self.params.prepared}: probabilities of shape {tuple(probs.shape)} are invalid")
        digest = _digest(probs)
        if self.expected_digest is not None and digest != self.expected_digest:
            raise SteeringStateError(f"{self.params.prepared}: the prepared probabilities changed since the checkpoint")
        self.expected_digest = digest
        logger.info("tsds: %d of %d pool samples have non-zero probability", int((probs > 0).sum()), len(probs))
        return probs

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if self.probabilities is None:
            self.probabilities = self._load(ctx)
        return draw(self.probabilities, ctx.num_samples, ctx.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"digest": self.expected_digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.expected_digest = state["digest"]
        self.probabilities = None


def _digest(probabilities: torch.Tensor) -> str:
    return hashlib.sha256(probabilities.contiguous().numpy().tobytes()).hexdigest()[:16]
