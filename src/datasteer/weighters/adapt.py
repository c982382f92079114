"""ADAPT: weights from the similarity of each sample to an anchor (target) set."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.finite import finite_rows
from datasteer.ops.embeddings import Pooling
from datasteer.ops.protocol import ModelOperations
from datasteer.registry import WEIGHTERS
from datasteer.weighters.base import RefreshesFromModel, UsesBatchEmbeddings, WeightContext, Weighter

logger = logging.getLogger(__name__)


@dataclass
class AdaptParams:
    """Parameters of :class:`AdaptWeighter`."""

    tau: float = doc("Temperature of the sigmoid (smaller: sharper weights).", default=1.0)
    refresh_every: int = doc("Optimizer steps between re-embeddings of the anchors with the live model.", default=50)
    center: bool = doc(
        "Subtract the micro-batch's mean score before the sigmoid (hidden states of small models are "
        "anisotropic: every cosine is high, so sigmoid(score / tau) saturates and all weights are equal).",
        default=False,
    )
    clip: float | None = doc("Upper bound on a weight before normalising (null: none).", default=None)
    normalize: bool = doc(
        "Scale the weights to average 1 over each data-parallel micro-batch (the loss then is "
        "sum w l / sum w per micro-batch, which depends on the micro-batch split); false: the raw "
        "sigmoid weights, loss (1/B) sum w l over the step, the same for any split.",
        default=False,
    )
    pooling: Pooling = doc(
        "How hidden states become one vector per sample: weighted (by position), mean, last.", default="weighted"
    )
    layer: int = doc("Hidden-state layer to pool (-1: the last).", default=-1)

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ConfigError(f"tau: must be > 0, got {self.tau}")
        if self.refresh_every < 1:
            raise ConfigError(f"refresh_every: must be >= 1, got {self.refresh_every}")
        if self.clip is not None and not self.clip > 0:
            raise ConfigError(f"clip: must be > 0 or null, got {self.clip}")


@WEIGHTERS.register("adapt")
class AdaptWeighter(Weighter, UsesBatchEmbeddings, RefreshesFromModel):
    """ADAPT: weight = sigmoid(mean cosine to the anchor set / tau), anchors re-embedded every few steps.

    The anchors are the target (evaluation) rows, embedded with the live model (pooled
    hidden states, L2-normalised) at train begin and every ``refresh_every`` optimizer
    steps (once per refresh, not at every micro-step of a refresh step as the reference
    does). Each training sample's embedding comes from the hidden states of the forward
    pass that computes its loss (the reference runs a second forward). Its weight is
    ``sigmoid(mean_a cos(x, a) / tau)`` (with ``center``, the micro-batch's mean score is
    subtracted first), optionally clipped at ``clip``. The step's loss is
    the mean ``(1/B) sum_i w_i l_i`` over its B samples (the reference sums, so its scale
    grows with the batch size), the same for any split into micro-batches and ranks; with
    ``normalize`` the weights are instead scaled to average 1 over each data-parallel
    micro-batch (``sum w l / sum w`` per micro-batch).

    An anchor whose embedding is not finite is left out (counted as ``nonfinite`` in the
    refresh record); a refresh without one finite anchor keeps the anchors it had, and with
    none at all every weight is 1.
    """

    Params = AdaptParams
    needs_model = True

    def __init__(self, params: AdaptParams) -> None:
        super().__init__(params)
        self.anchors: torch.Tensor | None = None  # (A, h), L2-normalised

    def embedding_layer(self) -> tuple[int, Pooling]:
        return self.params.layer, self.params.pooling

    def refresh_every(self) -> int:
        return int(self.params.refresh_every)

    def refresh(self, ops: ModelOperations) -> dict[str, Any]:
        p: AdaptParams = self.params
        anchors = ops.target_embeddings(layer=p.layer, pooling=p.pooling, normalize=True).float()
        finite = finite_rows(anchors)
        if bool(finite.any()) or self.anchors is None:
            self.anchors = torch.nn.functional.normalize(anchors[finite], dim=-1)
        if not bool(finite.all()):
            logger.warning(
                "adapt: %d of %d anchor embeddings are NaN or infinite and are left out%s",
                int((~finite).sum()),
                len(finite),
                "" if finite.any() else "; the anchors in force are kept (weight 1 if there are none)",
            )
        return {"anchors": int(self.anchors.shape[0]), "nonfinite": int((~finite).sum())}

    def weigh(self, ctx: WeightContext) -> torch.Tensor:
        p: AdaptParams = self.params
        if self.anchors is None:
            raise SteeringStateError("adapt: the anchors were not embedded before the first weighted step")
        if ctx.embeddings is None:
            raise SteeringStateError("adapt: the batch's embeddings are missing")
        if len(self.anchors) == 0:  # no finite anchor yet: nothing to compare with
            return torch.ones(len(ctx.losses), dtype=torch.float64)
        x = torch.nn.functional.normalize(ctx.embeddings.float(), dim=-1)
        score = (x @ self.anchors.t()).mean(dim=1)
        if p.center:
            score = score - score.mean()
        weights = torch.sigmoid(score / p.tau)
        if p.clip is not None:
            weights = weights.clamp(max=p.clip)
        if p.normalize:
            weights = weights * len(weights) / weights.sum().clamp_min(1e-12)
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": self.anchors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors = state["anchors"]
