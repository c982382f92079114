"""Random domain proportions, redrawn at every update."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from datasteer.config import doc
from datasteer.errors import ConfigError
from datasteer.mixers.base import MixContext, Mixer
from datasteer.registry import MIXERS


@dataclass
class RandomMixParams:
    """Parameters of :class:`RandomMixer`."""

    concentration: float = doc(
        "Dirichlet concentration of every domain: 1 is uniform over the simplex, large values stay near uniform.",
        default=1.0,
    )

    def __post_init__(self) -> None:
        if not self.concentration > 0:
            raise ConfigError(f"concentration: must be > 0, got {self.concentration}")


@MIXERS.register("random")
class RandomMixer(Mixer):
    """Proportions drawn from a symmetric Dirichlet at every update.

    A control for dynamic mixers. Each update draws from a generator seeded by
    (seed, update), so the proportions change from update to update (re-seeding with one
    fixed seed at every call would return the same vector forever).
    """

    Params = RandomMixParams

    def update(self, ctx: MixContext) -> torch.Tensor:
        k = len(ctx.domain_names)
        # torch has no generator-driven Dirichlet; numpy's is standard, seeded from ctx.generator.
        seed = int(torch.randint(2**62, (1,), generator=ctx.generator))
        draw = np.random.default_rng(seed).dirichlet(np.full(k, self.params.concentration))
        return torch.from_numpy(draw).to(torch.float64)
