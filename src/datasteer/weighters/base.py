"""The weighter interface: per-sample losses of a batch in, per-sample weights out.

The training loss of a step is ``(1 / B) * sum_i w_i * l_i`` over the B samples of the
global batch, with ``l_i`` the token-mean loss of sample i. A weighter that normalises
returns weights with mean 1, so uniform weights give the plain mean of per-sample losses.

A weighter sees the **data-parallel micro-batch**: the samples of one micro-step on every
rank, gathered in rank order, so N ranks x micro-batch b give the same weights as one rank
x micro-batch N * b (each rank then keeps its own samples' weights). Optional needs are
capability classes: :class:`UsesBatchEmbeddings` (pooled hidden states of the same
forward pass), :class:`RefreshesFromModel` (e.g. anchor embeddings recomputed every few
steps) and :class:`~datasteer.capabilities.ComparesToReference` (a reference model's
per-sample losses).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from datasteer.algorithm import Algorithm
from datasteer.ops.embeddings import Pooling
from datasteer.ops.protocol import ModelOperations


@dataclass(frozen=True)
class WeightContext:
    """What a weighter may look at for one data-parallel micro-batch of ``n`` samples.

    Attributes:
        step: the optimizer step being trained (1-based).
        max_steps: total optimizer steps of the run.
        losses: token-mean loss of each sample, detached, ``(n,)``.
        indices: pool index of each sample, ``(n,)``.
        domains: domain id of each sample, ``(n,)``.
        domain_names: names of the domain ids.
        generator: the only source of randomness, seeded from (seed, step, micro-step).
        embeddings: pooled hidden states of the training forward pass, ``(n, h)``
            (only for a :class:`UsesBatchEmbeddings` weighter).
        reference_losses: the reference model's token-mean loss of each sample, ``(n,)``
            (only for a :class:`~datasteer.capabilities.ComparesToReference` weighter).
    """

    step: int
    max_steps: int
    losses: torch.Tensor
    indices: torch.Tensor
    domains: torch.Tensor
    generator: torch.Generator
    embeddings: torch.Tensor | None = None
    reference_losses: torch.Tensor | None = None
    domain_names: tuple[str, ...] = ()


class Weighter(Algorithm[Any]):
    """Gives each sample of a batch a loss weight."""

    @abstractmethod
    def weigh(self, ctx: WeightContext) -> torch.Tensor:
        """Return non-negative weights of shape ``ctx.losses.shape`` (no gradient)."""


class UsesBatchEmbeddings(ABC):
    """Capability: needs each sample's pooled hidden state from the training forward pass
    (``WeightContext.embeddings``; no second forward is made)."""

    @abstractmethod
    def embedding_layer(self) -> tuple[int, Pooling]:
        """``(layer, pooling)``: which hidden-state layer (``-1``: the last) and how it is pooled."""


class RefreshesFromModel(ABC):
    """Capability: recomputes something from the live model every few optimizer steps."""

    @abstractmethod
    def refresh_every(self) -> int:
        """Optimizer steps between refreshes (the first is at train begin)."""

    @abstractmethod
    def refresh(self, ops: ModelOperations) -> dict[str, Any]:
        """Recompute from the live model; returns numbers for the run record."""
