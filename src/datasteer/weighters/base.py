"""The weighter interface: per-sample losses of a batch in, per-sample weights out.

The training loss of a step is ``(1 / B) * sum_i w_i * l_i`` over the B samples of the
global batch, with ``l_i`` the token-mean loss of sample i. A weighter that normalises
returns weights with mean 1, so uniform weights give the plain mean of per-sample losses.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from datasteer.algorithm import Algorithm


@dataclass(frozen=True)
class WeightContext:
    """What a weighter may look at for one micro-batch.

    Attributes:
        step: the optimizer step being trained (1-based).
        max_steps: total optimizer steps of the run.
        losses: token-mean loss of each sample, detached, shape ``(b,)``.
        indices: pool index of each sample, shape ``(b,)``.
        domains: domain id of each sample, shape ``(b,)``.
        generator: the only source of randomness, seeded from (seed, step, micro-batch).
    """

    step: int
    max_steps: int
    losses: torch.Tensor
    indices: torch.Tensor
    domains: torch.Tensor
    generator: torch.Generator


class Weighter(Algorithm[Any]):
    """Gives each sample of a batch a loss weight."""

    @abstractmethod
    def weigh(self, ctx: WeightContext) -> torch.Tensor:
        """Return non-negative weights of shape ``ctx.losses.shape`` (no gradient)."""
