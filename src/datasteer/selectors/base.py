"""The selector interface: a typed context in, pool indices out."""

from __future__ import annotations

import functools
import logging
import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from datasteer.algorithm import Algorithm, UpdateContext
from datasteer.errors import ConfigError, SteeringStateError

logger = logging.getLogger(__name__)


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


def candidate_subset(ctx: SelectContext, size: int | None, *, keeps_top: str | None = None) -> torch.Tensor:
    """Pool indices to score this update: all of them, or a fresh sorted random subset of ``size``.

    Args:
        ctx: the update's context.
        size: candidates to score (``None``: the whole pool).
        keeps_top: the name of a selector that keeps the ``ctx.num_samples`` best-scored
            candidates: it is warned (once per setting) when there are not more candidates
            than that, since the selection then keeps them all and its scores change nothing.
    """
    if size is None or size >= ctx.pool_size:
        candidates = torch.arange(ctx.pool_size)
    else:
        candidates = torch.randperm(ctx.pool_size, generator=ctx.generator)[:size].sort().values
    if keeps_top is not None:
        warn_if_no_choice(keeps_top, ctx, len(candidates), subset=size is not None and size < ctx.pool_size)
    return candidates


def warn_if_no_choice(name: str, ctx: SelectContext, candidates: int, *, subset: bool) -> None:
    """Warn (once per setting) a selector that keeps its ``ctx.num_samples`` best-scored
    candidates when it has no more than that many: it keeps them all, whatever its scores.

    Args:
        name: the selector's name.
        ctx: the update's context.
        candidates: how many candidates it scored.
        subset: whether they were a subset of the pool (the fix is then more candidates).
    """
    if candidates <= ctx.num_samples:
        _warn_no_choice(name, candidates, ctx.num_samples, subset)


def candidate_count(selected: int, fraction: float) -> int:
    """Candidates to score so that ``selected`` of them are a ``fraction``: ``ceil(selected /
    fraction)``, immune to float noise (``8 / 0.1`` is 80, not 81)."""
    return math.ceil(round(selected / fraction, 9))


#: Candidate rows per selected row in a streamed run's windows, for selectors without their own ratio.
DEFAULT_WINDOW_RATIO = 4.0


def refuse_streams(name: str, why: str) -> ConfigError:
    """The error of a selector that needs the whole pool, which streamed domains never hold
    (raised by its :meth:`Selector.check_streams`); ``why`` says what it needs it for."""
    return ConfigError(
        f"datasteer.select: {name} cannot choose from streamed domains: {why}; give a map-style training set "
        "(streaming: false)"
    )


class PoolPasses:
    """Candidate batches as successive slices of shuffled passes over the pool.

    This is how a data loader that shuffles each epoch serves the large batches that online
    batch selection (RHO-LOSS, GREATS) chooses from: every sample is a candidate once per
    pass. A batch that crosses the end of a pass takes the pass's last samples and opens
    the next pass with them, followed by the other samples in a fresh seeded order, so a
    batch never holds a sample twice and each pass is a permutation. Each permutation is
    drawn from the context's generator of the update that needs it, so the passes are the
    same on every rank; they are part of the selector's state.
    """

    def __init__(self) -> None:
        self.order: torch.Tensor | None = None  # the current pass
        self.position = 0  # where the next batch starts in it

    def next(self, ctx: SelectContext, size: int) -> torch.Tensor:
        """The next ``size`` candidates, sorted by pool index (the whole pool if it is not larger)."""
        n = ctx.pool_size
        if self.order is not None and len(self.order) != n:
            raise SteeringStateError(f"the selector's state is for a pool of {len(self.order)} samples, this has {n}")
        if size >= n:
            return torch.arange(n)
        if self.order is None:
            self.order, self.position = torch.randperm(n, generator=ctx.generator), 0
        batch = self.order[self.position : self.position + size]
        if len(batch) < size:
            fresh = torch.randperm(n, generator=ctx.generator)
            self.order, self.position = torch.cat([batch, fresh[~torch.isin(fresh, batch)]]), 0
            batch = self.order[:size]
        self.position += size
        return batch.sort().values

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.position = state["order"], int(state["position"])


@functools.cache
def _warn_no_choice(name: str, candidates: int, selected: int, subset: bool) -> None:
    fix = (
        "raise `candidates` above it"
        if subset
        else "the pool (or this domain's share of it) is smaller than the steps need"
    )
    logger.warning(
        "%s: keeps the best %d of only %d candidates, i.e. all of them: the selection does not depend on its "
        "scores (the selection size is global batch x update_every); %s",
        name,
        selected,
        candidates,
        fix,
    )


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

    def check_streams(self) -> None:
        """Raise a ConfigError if this selector cannot choose from candidate windows of
        streamed domains, where each update's pool is rows it has never seen (e.g. it
        compares a sample with its own earlier score). Called before any model loads."""

    def reset_pool(self) -> None:
        """Forget what is tied to the previous pool's indices: with streamed domains each
        update's pool is a new candidate window, renumbered from 0."""

    def window_ratio(self) -> float:
        """Candidate rows per selected row that a streamed run's windows hold, unless the run
        sets ``stream_window``."""
        return DEFAULT_WINDOW_RATIO

    @abstractmethod
    def select(self, ctx: SelectContext) -> torch.Tensor:
        """Return a 1-D long tensor of pool indices (usually ``ctx.num_samples`` of them).

        The sampler serves them in a seeded shuffled order, cycling if the steps need more.
        """
