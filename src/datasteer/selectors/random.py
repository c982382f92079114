"""Uniformly random selection."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError
from datasteer.registry import SELECTORS
from datasteer.selectors.base import SelectContext, Selector


@dataclass
class RandomSelectParams:
    """Parameters of :class:`RandomSelector`."""

    replacement: bool = doc("Draw with replacement (otherwise a permutation prefix).", default=False)
    fraction: float | None = doc(
        "Select this fraction of the pool instead of one global batch per step until the next update.",
        default=None,
    )

    def __post_init__(self) -> None:
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction: must be in (0, 1], got {self.fraction}")


@SELECTORS.register("random")
class RandomSelector(Selector):
    """Uniform random subset of the pool, fresh at every update (a new seeded draw each time).

    Baseline of every selection paper; unlike a fixed seed re-used at each update, each
    update draws from a generator seeded by (seed, update), so updates differ.
    """

    Params = RandomSelectParams

    def select(self, ctx: SelectContext) -> torch.Tensor:
        p: RandomSelectParams = self.params
        n = ctx.num_samples if p.fraction is None else max(1, math.floor(p.fraction * ctx.pool_size + 0.5))
        if p.replacement:
            return torch.randint(ctx.pool_size, (n,), generator=ctx.generator)
        # Without replacement: whole permutations, concatenated if more than the pool is asked for.
        chunks = [torch.randperm(ctx.pool_size, generator=ctx.generator) for _ in range(-(-n // ctx.pool_size))]
        return torch.cat(chunks)[:n]
