"""The weight driver: a loss weight for every sample of every micro-batch after the warm-up.

Steps ``1..warmup_steps`` train with weight 1. After each optimizer step, the statistics
of that step's weights (over all micro-batches and ranks) become one record.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from datasteer import dist
from datasteer.drivers.base import Driver, OpsFactory, TrainedBatch
from datasteer.errors import SteeringStateError
from datasteer.rng import torch_generator
from datasteer.weighters.base import WeightContext, Weighter


class WeightDriver(Driver[Weighter]):
    """Runs a :class:`~datasteer.weighters.base.Weighter`."""

    paradigm = "weight"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stats: list[float] | None = None  # sum, count, min, max of this step's weights
        self._seconds = 0.0
        self._micro = 0

    @property
    def needs_sample_losses(self) -> bool:
        return True

    @property
    def weights_loss(self) -> bool:
        return True

    def loss_weights(self, step: int, batch: TrainedBatch) -> torch.Tensor | None:
        assert batch.losses is not None
        losses = batch.losses
        if step <= self.stage.warmup_steps:
            return None
        started = time.perf_counter()
        ctx = WeightContext(
            step=step,
            max_steps=self.run.max_steps,
            losses=losses.detach(),
            indices=torch.from_numpy(batch.indices),
            domains=torch.from_numpy(batch.domains),
            generator=torch_generator(self.run.seed, "weight", step, dist.rank(), self._micro),
        )
        self._micro += 1
        weights = self.algorithm.weigh(ctx).detach()
        if weights.shape != losses.shape or not torch.isfinite(weights).all() or (weights < 0).any():
            raise SteeringStateError(
                f"{self.stage.algorithm} returned invalid weights (shape {tuple(weights.shape)}, "
                f"expected {tuple(losses.shape)}, finite and >= 0)"
            )
        w = weights.float().cpu()
        stats = [float(w.sum()), float(w.numel()), float(w.min()), float(w.max())]
        s = self._stats
        self._stats = (
            stats if s is None else [s[0] + stats[0], s[1] + stats[1], min(s[2], stats[2]), max(s[3], stats[3])]
        )
        self._seconds += time.perf_counter() - started
        return weights

    def decide(self, step: int, ops: OpsFactory) -> list[dict[str, Any]]:
        if step == 0:
            return []
        s = self._stats or [0.0, 0.0, float("inf"), float("-inf")]
        total = dist.all_reduce(torch.tensor(s[:2], dtype=torch.float64))
        low = dist.all_reduce(torch.tensor([s[2]], dtype=torch.float64), "min")
        high = dist.all_reduce(torch.tensor([s[3]], dtype=torch.float64), "max")
        self._stats, self._micro = None, 0
        if total[1] == 0:  # warm-up (weight 1), or no weighted batch on any rank
            return []
        seconds, self._seconds = self._seconds, 0.0
        return [
            {
                "step": step,
                "weight_mean": float(total[0] / total[1]),
                "weight_min": float(low[0]),
                "weight_max": float(high[0]),
                "seconds": round(seconds, 6),
            }
        ]
