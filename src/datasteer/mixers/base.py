"""The mixer interface: a typed context in, proportions over domains out."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from datasteer.algorithm import Algorithm
from datasteer.errors import ConfigError

if TYPE_CHECKING:
    from datasteer.ops import ModelOps

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


@dataclass(frozen=True)
class MixContext:
    """What a mixer may look at when it sets the proportions of steps ``first_step..last_step``.

    Attributes:
        step: optimizer steps the model has completed when the update is made.
        first_step: first step (1-based) the proportions shape.
        last_step: last step they shape before the next update (``max_steps`` if none).
        max_steps: total optimizer steps of the run.
        update: index of this update (0 for the first; -1 for the initial proportions).
        domain_names: names of the K domains, in proportion order.
        domain_sizes: number of pool samples in each domain.
        proportions: the proportions in force now, shape ``(K,)``, float64.
        generator: the only source of randomness, seeded from (seed, update).
        ops: model operations bound to the live model (``None`` unless ``needs_model``).
    """

    step: int
    first_step: int
    last_step: int
    max_steps: int
    update: int
    domain_names: tuple[str, ...]
    domain_sizes: tuple[int, ...]
    proportions: torch.Tensor
    generator: torch.Generator
    ops: ModelOps | None = None


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
