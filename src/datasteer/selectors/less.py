"""LESS: select the pool samples whose gradients align best with the target samples' gradients."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from datasteer.config import doc
from datasteer.errors import ConfigError, NonFiniteInputError
from datasteer.finite import finite_rows
from datasteer.ops.feature_store import FeatureStore
from datasteer.ops.gradients import DEFAULT_VMAP_CHUNK, GradFeatureConfig
from datasteer.ops.similarity import mean_similarity
from datasteer.registry import SELECTORS
from datasteer.selectors.base import SelectContext, Selector, candidate_subset

if TYPE_CHECKING:
    from datasteer.ops.protocol import ModelOperations


@dataclass
class GradientFeatureParams:
    """Gradient-feature settings shared by the gradient-based selectors (LESS, cluster-LESS, NICE)."""

    proj_dim: int = doc("Dimension of the random projection of the gradients (LESS paper: 8192).", default=1024)
    method: str = doc(
        "Gradient-feature method: auto (hooks where every trainable parameter is a linear weight, e.g. "
        "LoRA, else vmap), hooks (one batched backward), vmap, loop or dense (all Adam-aware, equal "
        "features); logra (SGD features only).",
        default="auto",
    )
    adam: bool = doc(
        "Precondition candidate gradients with the live Adam state, as one more Adam step would (LESS paper: yes).",
        default=True,
    )
    projection_seed: int = doc("Seed of the projection (fixed for the run, so scores are comparable).", default=0)
    vmap_chunk: int | None = doc(
        "Samples whose per-sample gradients vmap/dense hold at a time (each scoring batch is cut into slices "
        "of this many): their memory is about vmap_chunk x the trainable parameters whatever the batch size; "
        "null: the whole batch at once.",
        default=DEFAULT_VMAP_CHUNK,
    )

    def __post_init__(self) -> None:
        if self.proj_dim < 1:
            raise ConfigError(f"proj_dim: must be >= 1, got {self.proj_dim}")
        if self.method not in ("auto", "vmap", "hooks", "loop", "dense", "logra"):
            raise ConfigError(
                f"method: {self.method!r} is not allowed; choose one of 'auto', 'vmap', 'hooks', 'loop', 'dense', "
                "'logra'"
            )
        if self.method == "logra" and self.adam:
            raise ConfigError("method: logra never forms full gradients, so it cannot apply Adam; set adam: false")
        if self.vmap_chunk is not None and self.vmap_chunk < 1:
            raise ConfigError(f"vmap_chunk: must be >= 1 or null, got {self.vmap_chunk}")

    def feature_config(self) -> GradFeatureConfig:
        """The gradient-feature settings of these params."""
        return GradFeatureConfig(
            method=self.method,  # type: ignore[arg-type]
            proj_dim=self.proj_dim,
            seed=self.projection_seed,
            vmap_chunk=self.vmap_chunk,
        )


@dataclass
class LessParams(GradientFeatureParams):
    """Parameters of :class:`LessSelector`."""

    candidates: int | None = doc(
        "Score a fresh random subset of this many pool samples per update (null: all).", default=None
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.candidates is not None and self.candidates < 1:
            raise ConfigError(f"candidates: must be >= 1 or null, got {self.candidates}")


def target_gradient_features(ops: ModelOperations, config: GradFeatureConfig, algorithm: str) -> list[torch.Tensor]:
    """Plain projected gradient features of every row of each target set, one matrix per set.

    Raises:
        ConfigError: the run has no target (evaluation) set.
    """
    if not ops.targets:
        raise ConfigError(f"{algorithm}: needs target samples; give the run an evaluation set (eval_dataset)")
    return [t.gradient_features(range(len(t.dataset)), config) for t in ops.targets]


def max_mean_cosine(pool: torch.Tensor, target_sets: Sequence[torch.Tensor]) -> torch.Tensor:
    """LESS's score of each pool row: its mean cosine with the rows of each target set, maximised over sets.

    Args:
        pool: ``(n, k)`` candidate features.
        target_sets: one ``(m_j, k)`` feature matrix per target set (each ``m_j >= 1``).

    Returns:
        ``(n,)`` float32 scores.
    """
    return torch.stack([mean_similarity(pool, t) for t in target_sets]).amax(dim=0)


def _finite_row_scores(rows: torch.Tensor | np.ndarray, target_sets: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`max_mean_cosine` of each row, ``-inf`` for a row that is not finite (row-wise)."""
    rows = torch.as_tensor(rows)
    finite = finite_rows(rows)
    if not target_sets:
        return torch.where(finite, 0.0, -math.inf)
    if bool(finite.all()):
        return max_mean_cosine(rows, target_sets)
    scores = torch.full((len(rows),), -math.inf)
    scores[finite] = max_mean_cosine(rows[finite], target_sets)
    return scores


def finite_scores(
    pool: torch.Tensor | FeatureStore, target_sets: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, int]:
    """:func:`max_mean_cosine` of the finite pool rows against the finite rows of each target set.

    A row that is not finite is left out of the scoring (never zeroed): a pool row scores
    ``-inf``, a target row is dropped (and a target set without a finite row). A
    :class:`~datasteer.ops.feature_store.FeatureStore` pool is scored chunk by chunk on
    each rank's own rows; only the scores are gathered. Either way a row's score depends
    on that row alone, so both give the same scores.

    Returns:
        ``(scores, left_out)``: ``(n,)`` float32 scores, or ``None`` when no pool row or no
        target row is finite; ``left_out`` counts the pool and target rows left out.
    """
    kept = [t[finite_rows(t)] for t in target_sets]
    left_out = sum(len(t) - len(k) for t, k in zip(target_sets, kept, strict=True))
    kept = [k for k in kept if len(k)]
    score = partial(_finite_row_scores, target_sets=kept)
    scores = pool.row_scores(score) if isinstance(pool, FeatureStore) else score(pool)
    finite = torch.isfinite(scores)
    left_out += int((~finite).sum())
    if not kept or not bool(finite.any()):
        return None, left_out
    return scores, left_out


def top_finite(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` highest finite scores (fewer if fewer are finite)."""
    return torch.topk(scores, min(k, int(torch.isfinite(scores).sum()))).indices


@SELECTORS.register("less")
class LessSelector(Selector):
    """LESS (Xia et al., 2024; arXiv 2402.04333): top-k pool samples by gradient cosine with the targets.

    Candidate feature: the gradient of the sample's loss w.r.t. the trainable parameters,
    preconditioned with the live optimizer's Adam state (its betas, epsilon and bias
    correction, as one more Adam step on the sample would see it), randomly projected to
    ``proj_dim`` and L2-normalised. Target feature: the plain projected, normalised
    gradient of each target (evaluation) sample. A candidate's score is its mean cosine
    with the targets of each target set, maximised over target sets (the paper's subtasks);
    the top ``num_samples`` are selected. Online: re-scored with the live model at every
    update; ``max_updates: 1`` with a long ``update_every`` scores once from the warm-up
    state (offline use). Features are computed in batches, sharded over ranks.
    """

    Params = LessParams
    needs_model = True

    def __init__(self, params: LessParams) -> None:
        super().__init__(params)
        self._report: dict[str, int | float] = {}

    def report(self) -> dict[str, int | float]:
        """``nonfinite``: candidate and target feature rows left out of the latest scoring."""
        return dict(self._report)

    def select(self, ctx: SelectContext) -> torch.Tensor:
        p: LessParams = self.params
        ops = ctx.ops
        assert ops is not None
        config = p.feature_config()
        targets = target_gradient_features(ops, config, "less")
        candidates = candidate_subset(ctx, p.candidates, keeps_top="less")
        optimizer = ops.optimizer if p.adam else None
        with ops.gradient_feature_store(candidates, config, optimizer=optimizer) as pool:
            scores, left_out = finite_scores(pool, targets)
        self._report = {"nonfinite": left_out}
        if scores is None:
            raise NonFiniteInputError(f"no finite gradient feature to score by ({left_out} rows are NaN or infinite)")
        return candidates[top_finite(scores, ctx.num_samples)]
