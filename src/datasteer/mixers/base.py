"""The mixer interface: a typed context in, proportions over domains out."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from datasteer.algorithm import Algorithm, UpdateContext
from datasteer.errors import ConfigError

#: Proportions must sum to 1 within this tolerance.
SUM_TOLERANCE = 1e-6


def check_proportions(values: Sequence[float], where: str, num_domains: int | None = None) -> None:
    """Raise a ConfigError unless ``values`` are K finite non-negative numbers summing to 1."""
    if num_domains is not None and len(values) != num_domains:
        raise ConfigError(f"{where}: expected {num_domains} proportions (one per domain), got {len(values)}")
    if not values:
        raise ConfigError(f"{where}: proportions are empty")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(f"{where}: proportions must be finite and >= 0, got {list(values)}")
    total = math.fsum(values)
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ConfigError(f"{where}: proportions must sum to 1, got {list(values)} (sum {total:.6g})")


@dataclass(frozen=True, kw_only=True)
class MixContext(UpdateContext):
    """What a mixer may look at when it sets the proportions of steps ``first_step..last_step``.

    Besides the fields of :class:`~datasteer.algorithm.UpdateContext` (``domain_names`` are
    the K domains in proportion order):

    Attributes:
        domain_sizes: number of pool samples in each domain.
        proportions: the proportions in force now, shape ``(K,)``, float64.
    """

    domain_sizes: tuple[int, ...]
    proportions: torch.Tensor


class Mixer(Algorithm):
    """Sets the proportions of each domain in the batches until the next update."""

    #: False for mixers whose proportions never change: the controller then skips updates.
    adaptive: ClassVar[bool] = True

    def check_domains(self, domain_names: Sequence[str]) -> None:
        """Validate params that depend on the domains (e.g. their number); ConfigError if not."""

    def initial(self, ctx: MixContext) -> torch.Tensor:
        """Proportions in force from step 1 (during warm-up). Default: uniform over domains."""
        k = len(ctx.domain_names)
        return torch.full((k,), 1.0 / k, dtype=torch.float64)

    @abstractmethod
    def update(self, ctx: MixContext) -> torch.Tensor:
        """Return the new proportions, shape ``(K,)``, non-negative, summing to 1."""
