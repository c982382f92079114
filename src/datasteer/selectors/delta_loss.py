"""Delta-loss selection: follow how much each sample's loss has dropped since the first update."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError, NonFiniteInputError
from datasteer.registry import SELECTORS
from datasteer.selectors.base import SelectContext, Selector, refuse_streams


@dataclass
class DeltaLossParams:
    """Parameters of :class:`DeltaLossSelector`."""

    window_size: float = doc("Fraction of the pool inside the sliding window.", default=0.3)
    outside_mass: float = doc("Sampling weight of samples outside the window (inside: 1).", default=0.025)
    sharpness: float = doc(
        "Slope of the sigmoid that slides the window: start = sigmoid(sharpness (s - 0.5)).", default=10.0
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.window_size <= 1.0:
            raise ConfigError(f"window_size: must be in (0, 1], got {self.window_size}")
        if not 0.0 <= self.outside_mass <= 1.0:
            raise ConfigError(f"outside_mass: must be in [0, 1], got {self.outside_mass}")
        if not self.sharpness > 0:
            raise ConfigError(f"sharpness: must be > 0, got {self.sharpness}")


def window_bounds(deltas_sorted: torch.Tensor, progress: float, params: DeltaLossParams) -> tuple[int, int]:
    """``[start, end)`` of the window over deltas sorted in descending order.

    The window holds ``round(window_size * N)`` samples; its start slides from the largest
    drops (progress 0) to the smallest (progress 1) along ``sigmoid(sharpness (s - 0.5))``.
    It ends before the first negative delta (loss that rose); if that cuts it short it
    slides back so that it still ends there. No positive delta: an empty window.
    """
    n = len(deltas_sorted)
    width = max(1, round(params.window_size * n))
    start = int(1.0 / (1.0 + math.exp(-params.sharpness * (progress - 0.5))) * (n - width))
    positive = int((deltas_sorted > 0).sum())
    end = min(start + width, positive)
    # Cut short by the negative deltas (even partly): slide back, keeping the width.
    start = max(0, end - width)
    return start, end


@SELECTORS.register("delta_loss")
class DeltaLossSelector(Selector):
    """Delta-loss selection: a window over the samples whose loss dropped most, sliding to smaller drops.

    The first update records every pool sample's loss ``L0`` with the live model and
    selects uniformly. Each later update computes ``delta = L0 - L_now``, sorts it in
    descending order and gives weight 1 to a window of ``window_size * N`` samples and
    ``outside_mass`` to the rest; the window starts at the largest drops and slides to
    smaller ones as training progresses (``s`` from 0 at the second update to 1 at the
    last; with a single such update ``s = 0``, where the reference divides by zero).
    Draws without replacement, with replacement only if more samples are needed than have
    positive weight.

    A sample whose ``L0`` or current loss is not finite is left out (weight 0, not ranked;
    the window is ``window_size`` of the finite deltas) and counted as ``nonfinite``. A
    first update without one finite loss records nothing (the next one records ``L0``).
    """

    Params = DeltaLossParams
    needs_model = True

    def check_streams(self) -> None:
        raise refuse_streams(
            "delta_loss",
            "it compares each sample's loss with its loss at warm-up, and "
            "a stream's candidate windows are new rows at every update",
        )

    def __init__(self, params: DeltaLossParams) -> None:
        super().__init__(params)
        self.initial_losses: torch.Tensor | None = None
        self._report: dict[str, int | float] = {}

    def report(self) -> dict[str, int | float]:
        """``nonfinite``: pool samples of the latest update left out for a non-finite loss (or ``L0``)."""
        return dict(self._report)

    def select(self, ctx: SelectContext) -> torch.Tensor:
        assert ctx.ops is not None
        losses = ctx.ops.sample_losses(torch.arange(ctx.pool_size), desc=f"delta-loss selector, update {ctx.update}")
        if self.initial_losses is None:
            finite = torch.isfinite(losses)
            self._report = {"nonfinite": int((~finite).sum())}
            if not bool(finite.any()):
                raise NonFiniteInputError(f"none of the {ctx.pool_size} pool losses is finite; L0 is not recorded")
            self.initial_losses = losses.clone()
            weights = torch.ones(ctx.pool_size, dtype=torch.float64)
        else:
            deltas = self.initial_losses - losses
            finite = torch.isfinite(deltas)
            self._report = {"nonfinite": int((~finite).sum())}
            if not bool(finite.any()):
                raise NonFiniteInputError(f"none of the {ctx.pool_size} loss drops is finite")
            weights = self.weights(deltas, self.progress(ctx))
            if not weights.sum() > 0:  # empty window and outside_mass 0: nothing to prefer
                weights = torch.where(finite, 1.0, 0.0).double()
        replacement = ctx.num_samples > int((weights > 0).sum())
        return torch.multinomial(weights, ctx.num_samples, replacement=replacement, generator=ctx.generator)

    @staticmethod
    def progress(ctx: SelectContext) -> float:
        """``s`` in [0, 1]: 0 at the first delta update (update 1), 1 at the last one."""
        later_updates = ctx.total_updates - 2  # update 0 only records L0
        return 0.0 if later_updates <= 0 else min(1.0, max(0.0, (ctx.update - 1) / later_updates))

    def weights(self, deltas: torch.Tensor, progress: float) -> torch.Tensor:
        """Sampling weight of each pool sample (1 inside the window, ``outside_mass`` outside,
        0 for a non-finite delta, which is not ranked)."""
        deltas = deltas.double()
        finite = torch.nonzero(torch.isfinite(deltas)).flatten()
        order = finite[torch.argsort(deltas[finite], descending=True, stable=True)]
        start, end = window_bounds(deltas[order], progress, self.params)
        weights = torch.zeros_like(deltas)
        weights[finite] = self.params.outside_mass
        weights[order[start:end]] = 1.0
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {"initial_losses": self.initial_losses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial_losses = state["initial_losses"]
