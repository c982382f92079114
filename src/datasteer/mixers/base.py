"""The mixer interface: a typed context in, proportions over domains out."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from datasteer.algorithm import Algorithm, UpdateContext
from datasteer.errors import ConfigError

if TYPE_CHECKING:
    from datasteer.ops.protocol import ModelOperations

#: Proportions must sum to 1 within this tolerance.
SUM_TOLERANCE = 1e-6

#: Suffix that marks an evaluation set as the held-out set of a domain (``prose_eval``).
EVAL_SUFFIX = "_eval"


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


def domain_eval_sets(ops: ModelOperations, domain_names: Sequence[str]) -> list[ModelOperations] | None:
    """The evaluation set of each domain (named ``<domain>`` or ``<domain>_eval``), in domain
    order; ``None`` unless every domain has one."""
    by_name = {t.name: t for t in ops.targets if t.name is not None}
    found = [by_name.get(n, by_name.get(f"{n}{EVAL_SUFFIX}")) for n in domain_names]
    return None if any(t is None for t in found) else [t for t in found if t is not None]


@dataclass(frozen=True, kw_only=True)
class MixContext(UpdateContext):
    """What a mixer may look at when it sets the proportions of steps ``first_step..last_step``.

    Besides the fields of :class:`~datasteer.algorithm.UpdateContext` (``domain_names`` are
    the K domains in proportion order):

    Attributes:
        domain_sizes: number of pool samples in each domain (0 for a streamed domain,
            whose size is unknown).
        proportions: the proportions in force now, shape ``(K,)``, float64.
        domains: domain id of each pool sample, shape ``(pool_size,)`` (for mixers that
            evaluate the model on pool samples of each domain; empty for streamed domains).
    """

    domain_sizes: tuple[int, ...]
    proportions: torch.Tensor
    domains: torch.Tensor


@dataclass(frozen=True)
class DomainStats:
    """Per-domain statistics of the samples trained in one optimizer step.

    Summed over the step's micro-batches and over all ranks, so every rank sees the same
    numbers. Losses are the per-sample token-mean losses of the training forward pass.

    Attributes:
        step: the optimizer step (1-based).
        proportions: the proportions in force for that step, ``(K,)``.
        samples: samples of each domain trained in the step, ``(K,)``.
        loss_sum: sum of those samples' token-mean losses, ``(K,)``.
        tokens: labelled tokens of each domain, ``(K,)``.
        token_loss_sum: sum of the token losses of each domain, ``(K,)``.
        excess_sum: sum over each domain's tokens of ``max(loss - reference loss, 0)``,
            ``(K,)``; ``None`` unless the mixer has a reference model (see
            :class:`ComparesToReference`).
    """

    step: int
    proportions: torch.Tensor
    samples: torch.Tensor
    loss_sum: torch.Tensor
    tokens: torch.Tensor
    token_loss_sum: torch.Tensor
    excess_sum: torch.Tensor | None = None

    def mean_sample_loss(self) -> torch.Tensor:
        """Mean per-sample loss of each domain; NaN for a domain absent from the step."""
        return torch.where(self.samples > 0, self.loss_sum / self.samples.clamp_min(1), torch.nan)


class Mixer(Algorithm[Any]):
    """Sets the proportions of each domain in the batches until the next update.

    One method to implement, :meth:`update`. Optional needs are capabilities a mixer also
    inherits (the mix driver asks for them): :class:`ObservesSteps` (learn from each
    trained step's per-domain losses), :class:`ComparesToReference` (a reference model's
    losses on the training batches) and :class:`ShapesDomainLoss` (weight the training loss
    per domain, and hand the learned proportions to a later run).
    """

    #: False for mixers whose proportions never change: the driver then skips updates.
    adaptive: ClassVar[bool] = True

    def report(self) -> dict[str, torch.Tensor | float]:
        """Statistics behind the latest proportions, added to each update's record; ``(K,)``
        tensors are written per domain."""
        return {}

    def check_streams(self) -> None:
        """Raise a ConfigError if this mixer cannot mix streamed domains (:mod:`datasteer.streams`),
        e.g. because it evaluates the model on pool rows of each domain, which streams do not
        hold. Called before any model loads."""

    def check_domains(self, domain_names: Sequence[str]) -> None:
        """Validate params that depend on the domains (e.g. their number); ConfigError if not."""

    def initial(self, ctx: MixContext) -> torch.Tensor:
        """Proportions in force from step 1 (during warm-up). Default: uniform over domains."""
        k = len(ctx.domain_names)
        return torch.full((k,), 1.0 / k, dtype=torch.float64)

    @abstractmethod
    def update(self, ctx: MixContext) -> torch.Tensor:
        """Return the new proportions, shape ``(K,)``, non-negative, summing to 1."""


class ObservesSteps(ABC):
    """Capability: learns from the training steps' per-domain statistics (ODM, DoReMi)."""

    @abstractmethod
    def observe(self, stats: DomainStats) -> None:
        """Called after every optimizer step with that step's per-domain statistics."""


class ShapesDomainLoss(ABC):
    """Capability: trains on ``sum_d alpha_d * L_d`` instead of the plain loss (DoReMi's proxy),
    and learns proportions for a later ``static`` run."""

    @abstractmethod
    def loss_weights(self) -> torch.Tensor:
        """Per-domain weights ``alpha`` (K,) of the objective ``sum_d alpha_d * L_d``, where
        ``L_d`` is the mean per-sample loss of the step's domain-d samples."""

    @abstractmethod
    def learned_proportions(self) -> torch.Tensor | None:
        """Proportions learned over the run (written to ``domain_weights.json`` at the end of
        training); ``None`` before any step was observed."""
