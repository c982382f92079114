"""Loss-tiered selection: sample more from the easy, medium or hard third of the pool."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError, NonFiniteInputError
from datasteer.registry import SELECTORS
from datasteer.selectors.base import SelectContext, Selector, candidate_subset

logger = logging.getLogger(__name__)


@dataclass
class LossSelectParams:
    """Parameters of :class:`LossSelector`."""

    focus: Literal["low", "medium", "high"] = doc("Which loss tier gets focus_weight.", default="high")
    focus_weight: float = doc("Weight of the focus tier; the other tiers have weight 1.", default=5.0)
    temperature: float = doc("Sampling probabilities are proportional to weight^(1/temperature).", default=1.0)
    quantiles: tuple[float, float] = doc(
        "Loss quantiles that split the tiers low | medium | high.", default=(0.33, 0.66)
    )
    candidates: int | None = doc(
        "Score a fresh random subset of this many pool samples at each update (null: the whole pool).", default=None
    )

    def __post_init__(self) -> None:
        if not self.focus_weight > 0:
            raise ConfigError(f"focus_weight: must be > 0, got {self.focus_weight}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        low, high = self.quantiles
        if not 0.0 < low < high < 1.0:
            raise ConfigError(f"quantiles: need 0 < low < high < 1, got {list(self.quantiles)}")
        if self.candidates is not None and self.candidates < 1:
            raise ConfigError(f"candidates: must be >= 1 or null, got {self.candidates}")


def tier_probabilities(losses: torch.Tensor, params: LossSelectParams) -> torch.Tensor:
    """Sampling probabilities from per-sample losses (0 for non-finite losses).

    Tiers split the valid losses at ``quantiles``: low ``<= q1 <`` medium ``<= q2 <`` high.
    Weight 1 everywhere, ``focus_weight`` in the focus tier, then ``w^(1/temperature)``
    normalised.
    """
    valid = torch.isfinite(losses)
    if not valid.any():
        raise NonFiniteInputError(f"none of the {len(losses)} candidates has a finite loss")
    q = torch.quantile(losses[valid].double(), torch.tensor(params.quantiles, dtype=torch.float64))
    x = losses.double()
    tier = {"low": x <= q[0], "medium": (x > q[0]) & (x <= q[1]), "high": x > q[1]}[params.focus]
    weights = torch.where(tier, params.focus_weight, 1.0).double() ** (1.0 / params.temperature)
    weights = torch.where(valid, weights, 0.0)
    return weights / weights.sum()


@SELECTORS.register("loss")
class LossSelector(Selector):
    """Loss-tiered sampling: more draws from the low, medium or high third of the pool's losses.

    The current model's per-sample loss sorts the pool into three tiers; the focus tier is
    sampled ``focus_weight`` times more often, sharpened or flattened by ``temperature``,
    without replacement.

    Scores every candidate with one batched, rank-sharded pass (the reference scores one
    sample at a time). A candidate whose loss is not finite is left out (probability 0;
    counted as ``nonfinite``). Falls back to drawing with replacement only when fewer
    candidates have a finite loss than samples are needed, and logs that it did.
    """

    Params = LossSelectParams
    needs_model = True

    def __init__(self, params: LossSelectParams) -> None:
        super().__init__(params)
        self._report: dict[str, int | float] = {}

    def report(self) -> dict[str, int | float]:
        """``nonfinite``: candidates of the latest update whose loss was not finite (left out)."""
        return dict(self._report)

    def select(self, ctx: SelectContext) -> torch.Tensor:
        p: LossSelectParams = self.params
        assert ctx.ops is not None
        candidates = candidate_subset(ctx, p.candidates)
        losses = ctx.ops.sample_losses(candidates, desc=f"loss selector, update {ctx.update}")
        self._report = {"nonfinite": int((~torch.isfinite(losses)).sum())}
        probs = tier_probabilities(losses, p)
        available = int((probs > 0).sum())
        replacement = ctx.num_samples > available
        if replacement:
            logger.warning(
                "loss selector: %d samples needed but only %d candidates have a finite loss; drawing with replacement",
                ctx.num_samples,
                available,
            )
        chosen = torch.multinomial(probs, ctx.num_samples, replacement=replacement, generator=ctx.generator)
        return candidates[chosen]
