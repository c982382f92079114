"""Reducible-loss weighting: RHO-LOSS's selection signal as per-sample loss weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from datasteer.capabilities import ComparesToReference
from datasteer.config import doc
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.registry import WEIGHTERS
from datasteer.weighters.base import WeightContext, Weighter
from datasteer.weighters.loss import tempered_softmax


@dataclass
class ReducibleParams:
    """Parameters of :class:`ReducibleLossWeighter`."""

    reference_model: str = doc(
        "Directory of the model whose losses stand for the irreducible loss (e.g. a model trained on "
        "held-out data, or DoReMi's step-1 reference run); required."
    )
    temperature: float = doc("Softmax temperature over the reducible losses (larger: closer to uniform).", default=1.0)
    fraction: float | None = doc(
        "Hard selection instead: the top fraction of each batch by reducible loss gets weight 1/fraction, "
        "the rest 0 (RHO-LOSS's rule); null: soft weights.",
        default=None,
    )

    def __post_init__(self) -> None:
        if not str(self.reference_model).strip():
            raise ConfigError("reference_model: give the directory of the reference model")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction: must be in (0, 1], got {self.fraction}")


@WEIGHTERS.register("reducible")
class ReducibleLossWeighter(Weighter, ComparesToReference):
    """Reducible-loss weights (RHO-LOSS, Mindermann et al., ICML 2022; arXiv 2206.07137).

    RHO-LOSS trains on the points whose loss can still be reduced: the reducible loss of
    sample i is ``r_i = l_i - l_ref_i``, its training loss minus the loss of a model that
    stands for the irreducible part (trained on held-out data). A sample that is hard for
    both (noise, a mislabel) has a small ``r``; one the model has already learnt also does.
    Here the signal weights the data-parallel micro-batch instead of choosing a sub-batch:
    ``w = b * softmax(r / temperature)`` (weights average 1), or, with ``fraction``, the
    paper's rule: the top ``k = ceil(fraction * b)`` samples by ``r`` get weight ``b / k``
    (about ``1/fraction``) and the rest 0. The reference losses come from one no-grad forward of the reference
    model on each micro-batch (the one DoReMi uses), with the same label smoothing.
    """

    Params = ReducibleParams

    def reference_model(self) -> str:
        return str(self.params.reference_model)

    def weigh(self, ctx: WeightContext) -> torch.Tensor:
        p: ReducibleParams = self.params
        if ctx.reference_losses is None:
            raise SteeringStateError("reducible: the reference model's losses are missing")
        reducible = ctx.losses.double() - ctx.reference_losses.double()
        b = len(reducible)
        if p.fraction is None:
            return b * tempered_softmax(reducible, p.temperature)
        keep = math.ceil(p.fraction * b)
        # Ties broken by position (stable), so every rank keeps the same samples.
        order = torch.sort(reducible, descending=True, stable=True).indices[:keep]
        weights = torch.zeros(b, dtype=torch.float64)
        weights[order] = b / keep
        return weights
