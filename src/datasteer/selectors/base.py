"""The selector interface: a typed context in, pool indices out."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from datasteer.algorithm import Algorithm, UpdateContext


@dataclass(frozen=True, kw_only=True)
class SelectContext(UpdateContext):
    """What a selector may look at when it chooses the data of steps ``first_step..last_step``.

    Besides the fields of :class:`~datasteer.algorithm.UpdateContext`:

    Attributes:
        total_updates: how many updates the run will make (this one included).
        num_samples: how many indices to return (global batch x steps per update).
        pool_size: number of candidates in the training pool.
        domains: domain id of each pool sample, shape ``(pool_size,)``.
    """

    total_updates: int
    num_samples: int
    pool_size: int
    domains: torch.Tensor


def candidate_subset(ctx: SelectContext, size: int | None) -> torch.Tensor:
    """Pool indices to score this update: all of them, or a fresh sorted random subset of ``size``."""
    if size is None or size >= ctx.pool_size:
        return torch.arange(ctx.pool_size)
    return torch.randperm(ctx.pool_size, generator=ctx.generator)[:size].sort().values


class Selector(Algorithm[Any]):
    """Chooses pool indices for the steps until the next update.

    Under a mixer, a selector chooses within one domain at a time: its context's pool is
    that domain's samples (renumbered from 0, and ``ctx.ops`` bound to them) and
    ``num_samples`` is the domain's share of the steps (see the README's composition rule).
    """

    def report(self) -> dict[str, int | float]:
        """Numbers behind the latest selection, added to its record in ``steering.jsonl``
        (under a mixer, summed over the domains' selections)."""
        return {}

    def check_within_domains(self) -> None:
        """Raise a ConfigError if this selector cannot choose within one domain's samples
        (e.g. it reads files prepared for the whole pool). Called when a run composes it
        with a mixer, before any model loads."""

    @abstractmethod
    def select(self, ctx: SelectContext) -> torch.Tensor:
        """Return a 1-D long tensor of pool indices (usually ``ctx.num_samples`` of them).

        The sampler serves them in a seeded shuffled order, cycling if the steps need more.
        """
