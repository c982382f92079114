"""The selector interface: a typed context in, pool indices out."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from datasteer.algorithm import Algorithm

if TYPE_CHECKING:
    from datasteer.ops import ModelOps


@dataclass(frozen=True)
class SelectContext:
    """What a selector may look at when it chooses the data of steps ``first_step..last_step``.

    Attributes:
        step: optimizer steps the model has completed when the selection is made.
        first_step: first step (1-based) the selection shapes.
        last_step: last step it shapes before the next update (``max_steps`` if none).
        max_steps: total optimizer steps of the run.
        update: index of this update (0 for the first).
        num_samples: how many indices to return (global batch x steps per update).
        pool_size: number of candidates in the training pool.
        domains: domain id of each pool sample, shape ``(pool_size,)``.
        domain_names: names of the domain ids.
        generator: the only source of randomness, seeded from (seed, update).
        ops: model operations bound to the live model (``None`` unless ``needs_model``).
    """

    step: int
    first_step: int
    last_step: int
    max_steps: int
    update: int
    num_samples: int
    pool_size: int
    domains: torch.Tensor
    domain_names: tuple[str, ...]
    generator: torch.Generator
    ops: ModelOps | None = None


class Selector(Algorithm):
    """Chooses pool indices for the steps until the next update."""

    @abstractmethod
    def select(self, ctx: SelectContext) -> torch.Tensor:
        """Return a 1-D long tensor of pool indices (usually ``ctx.num_samples`` of them).

        The sampler serves them in a seeded shuffled order, cycling if the steps need more.
        """
