"""The driver protocol: what the controller asks of each stage (mix, select, weight).

A driver runs one algorithm inside the shared core. The controller keeps the schedule
clock, the run record, rank agreement of the records and the state file; a driver
implements its paradigm's part:

* :meth:`Driver.begin` at train begin (e.g. the mixer's initial proportions);
* :meth:`Driver.decide` after each optimizer step (updates due now, per its schedule);
* :meth:`Driver.observe` for each trained micro-batch (per-sample losses, when asked);
* :meth:`Driver.loss_weights` for each micro-batch, when it weights the training loss;
* :meth:`Driver.state_dict` / :meth:`Driver.load_state_dict` for exact resume.

Each returns event payloads (plain dicts); the controller adds ``step``, ``paradigm``,
``algorithm``, ``served`` and ``seconds`` and writes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch

from datasteer.config import StageConfig
from datasteer.errors import SteeringStateError
from datasteer.ops.protocol import NO_MODEL, ModelOperations
from datasteer.plugins import unwrap
from datasteer.samplers import MixtureSampler, SelectionSampler
from datasteer.schedule import Schedule
from datasteer.streams import decode

A = TypeVar("A")

#: Builds the model operations on demand (only algorithms that need the model call it).
OpsFactory = Callable[[], ModelOperations] | None


@dataclass
class RunInfo:
    """What every driver of a run shares: the pool's domains, the batch, the seed, the stream."""

    domains: np.ndarray
    domain_names: tuple[str, ...]
    global_batch: int
    seed: int
    sampler: MixtureSampler | SelectionSampler | None
    max_steps: int = 0
    #: The domains are streams (:mod:`datasteer.streams`): ``domains`` is empty and an index
    #: names its domain itself.
    streamed: bool = False

    def domain_of(self, indices: np.ndarray) -> np.ndarray:
        """Domain id of each index of the stream."""
        return decode(indices, self.num_domains)[0] if self.streamed else self.domains[indices]

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def per_domain(self, values: Any) -> dict[str, float]:
        """``{domain: value}`` with values rounded for the record."""
        return {n: round(float(v), 8) for n, v in zip(self.domain_names, values, strict=True)}


@dataclass
class TrainedBatch:
    """One trained micro-batch, as the drivers see it.

    Attributes:
        indices: pool index of each sample, ``(b,)``.
        domains: domain id of each sample, ``(b,)``.
        losses: token-mean loss of each sample (``None`` unless a driver asked for losses).
        tokens: labelled tokens of each sample.
        excess: summed per-token excess loss over the reference model of each sample.
        reference_losses: the reference model's token-mean loss of each sample.
        embeddings: pooled hidden states of each sample from the training forward pass.
    """

    indices: np.ndarray
    domains: np.ndarray
    losses: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    excess: torch.Tensor | None = None
    reference_losses: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None


class Driver(ABC, Generic[A]):
    """Runs one stage's algorithm of type ``A`` (see the module docstring)."""

    paradigm: ClassVar[str]

    def __init__(self, stage: StageConfig, algorithm: A, run: RunInfo, lag: int) -> None:
        self.stage = stage
        # A ``custom`` algorithm's user instance runs itself, with its own capability classes.
        self.algorithm: A = unwrap(algorithm)
        self.run = run
        self.schedule = Schedule(stage.warmup_steps, stage.update_every, stage.max_updates, lag)

    # -- capabilities the integrations ask for ---------------------------------------------
    @classmethod
    def uses_sample_losses(cls, algorithm: Any) -> bool:
        """Whether a stage of this paradigm running ``algorithm`` needs each training batch's
        per-sample losses (asked before anything loads, e.g. to refuse a fused-loss kernel)."""
        return False

    @property
    def needs_sample_losses(self) -> bool:
        """Whether :meth:`observe` needs the batch's per-sample losses."""
        return self.uses_sample_losses(self.algorithm)

    @property
    def weights_loss(self) -> bool:
        """Whether :meth:`loss_weights` reweights the training loss."""
        return False

    def reference_model(self) -> str | None:
        """Directory of a reference model whose losses the stage needs on every training batch."""
        return None

    def embedding_layer(self) -> tuple[int, Any] | None:
        """``(layer, pooling)`` of the batch embeddings the stage needs from the training forward."""
        return None

    def learned(self) -> dict[str, Any] | None:
        """What the stage learned over the run, for a later run (``domain_weights.json``)."""
        return None

    # -- events ----------------------------------------------------------------------------
    def begin(self) -> list[dict[str, Any]]:
        """At train begin (not on resume): set the initial plan."""
        return []

    @abstractmethod
    def decide(self, step: int, ops: OpsFactory) -> list[dict[str, Any]]:
        """After optimizer step ``step`` (0: train begin): act on what is due."""

    def observe(self, batch: TrainedBatch) -> None:
        """A micro-batch was trained."""

    def loss_weights(self, step: int, batch: TrainedBatch) -> torch.Tensor | None:
        """Loss weights of the micro-batch's samples (``None``: this stage does not weight)."""
        return None

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self.algorithm.state_dict()  # type: ignore[attr-defined]
        return {"algorithm": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(state["algorithm"])  # type: ignore[attr-defined]

    # -- shared helpers --------------------------------------------------------------------
    def model_ops(self, needs_model: bool, ops: OpsFactory) -> ModelOperations:
        """The model operations for an algorithm's context (:data:`NO_MODEL` if it needs none)."""
        if not needs_model:
            return NO_MODEL
        if ops is None:
            raise SteeringStateError(f"{self.stage.algorithm} needs the model, but no model operations were given")
        return ops()
