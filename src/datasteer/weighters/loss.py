"""Loss-based sample reweighting (Sow et al., ICLR 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError
from datasteer.registry import WEIGHTERS
from datasteer.weighters.base import WeightContext, Weighter

Strategy = Literal["linupper", "uniform", "quadratic", "extremes"]


@dataclass
class LossWeightParams:
    """Parameters of :class:`LossWeighter`."""

    strategy: Strategy = doc(
        "How a normalised loss n in [-delta, delta] becomes a score: linupper min(n + delta, delta) "
        "(up-weights the high-loss half, caps it), uniform n, quadratic 1 - n^2/delta^2 (the middle), "
        "extremes |n| (both ends).",
        default="linupper",
    )
    delta: float = doc("Half-width of the range the batch's losses are normalised to.", default=1.0)
    temperature: float = doc("Softmax temperature r (large: near-uniform weights).", default=1.0)
    temperature_end: float | None = doc(
        "Temperature at the last step, reached linearly from `temperature` (null: fixed, as the reference).",
        default=None,
    )

    def __post_init__(self) -> None:
        if not self.delta > 0:
            raise ConfigError(f"delta: must be > 0, got {self.delta}")
        for key in ("temperature", "temperature_end"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")


@WEIGHTERS.register("loss")
class LossWeighter(Weighter):
    """Loss-based reweighting (Sow et al., ICLR 2025, "Dynamic Loss-Based Sample Reweighting for Improved LLM Pretraining").

    Over the data-parallel micro-batch (every rank's samples of the micro-step), the
    per-sample losses ``l`` are normalised to ``[-delta, delta]``:
    ``n = (2 l - (max + min)) / (max - min) * delta`` (all ``n = 0`` when every loss is
    equal); a strategy turns ``n`` into a score ``f(n)`` (``linupper``:
    ``min(n + delta, delta)``; ``uniform``: ``n``; ``quadratic``: ``1 - n^2 / delta^2``;
    ``extremes``: ``|n|``), and the weights are ``w = b * softmax(f(n) / r)``, so they
    average 1 over the ``b`` samples and the loss is the paper's ``sum_i softmax_i * l_i``.
    The temperature ``r`` may move linearly over training to ``temperature_end``.
    """

    Params = LossWeightParams

    def temperature(self, step: int, max_steps: int) -> float:
        """``r`` at ``step`` (1-based) of ``max_steps``."""
        p: LossWeightParams = self.params
        if p.temperature_end is None or max_steps <= 1:
            return p.temperature
        progress = min(1.0, max(0.0, (step - 1) / (max_steps - 1)))
        return p.temperature + (p.temperature_end - p.temperature) * progress

    def scores(self, losses: torch.Tensor) -> torch.Tensor:
        """``f(n)`` of each loss (see the class docstring)."""
        p: LossWeightParams = self.params
        loss = losses.double()
        low, high = loss.min(), loss.max()
        spread = high - low
        # Written as a position in [0, 1] first: 2 l - (max + min) overflows for huge finite losses.
        n = ((loss - low) / spread * 2 - 1) * p.delta if spread > 0 else torch.zeros_like(loss)  # all equal: 0
        if p.strategy == "linupper":
            return torch.clamp(n + p.delta, max=p.delta)
        if p.strategy == "uniform":
            return n
        if p.strategy == "quadratic":
            return 1 - n**2 / p.delta**2
        return n.abs()

    def weigh(self, ctx: WeightContext) -> torch.Tensor:
        r = self.temperature(ctx.step, ctx.max_steps)
        return len(ctx.losses) * tempered_softmax(self.scores(ctx.losses), r)


def tempered_softmax(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(scores / temperature)`` of finite scores, finite for any temperature > 0.

    The largest score is subtracted before dividing: ``scores / temperature`` may overflow to
    ``inf`` (a tiny temperature, huge scores) and make the softmax NaN, while the shifted
    values are at most 0 (the largest stays 0, the others may go to ``-inf``: weight 0).
    """
    shifted = scores.double() - scores.double().max()
    return torch.softmax(shifted / temperature, dim=0)
