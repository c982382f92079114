"""The model operations an algorithm may call, as a Protocol.

:class:`datasteer.ops.ModelOps` implements it on the live model; tests implement it with
fixed tensors. Algorithms that do not need the model receive :data:`NO_MODEL`, whose every
use is a :class:`~datasteer.errors.SteeringStateError` (an algorithm that calls the model
must say so with ``needs_model = True``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from datasteer.errors import SteeringStateError

if TYPE_CHECKING:
    from datasteer.ops.feature_store import FeatureStore
    from datasteer.ops.policy_gradient import PolicyGradientFeatures


class ModelOperations(Protocol):
    """Batched passes of the live model over rows of one data set (the pool or a target set).

    Every method takes row indices of :attr:`dataset` and returns one row per index, in
    order, the same on every rank; the ``*_store`` methods instead leave each rank's share
    of the rows on disk (a :class:`~datasteer.ops.feature_store.FeatureStore`, to be
    closed), for pools whose features do not fit in memory.
    """

    model: nn.Module
    dataset: Any
    device: torch.device
    optimizer: torch.optim.Optimizer | None
    name: str | None

    @property
    def targets(self) -> Sequence[ModelOperations]:
        """The target (evaluation) sets, each with its own rows."""
        ...

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ModelOperations:
        """The same operations over rows ``indices`` of :attr:`dataset` (renumbered from 0)."""
        ...

    def sample_losses(self, indices: Sequence[int] | torch.Tensor, desc: str = ...) -> torch.Tensor: ...

    def reference_losses(self, indices: Sequence[int] | torch.Tensor, desc: str = ...) -> torch.Tensor:
        """:meth:`sample_losses` under the run's frozen reference model (for an algorithm that
        declares :class:`~datasteer.capabilities.ComparesToReference`)."""
        ...

    def embeddings(
        self, indices: Sequence[int] | torch.Tensor, *, layer: int = ..., pooling: Any = ..., normalize: bool = ...
    ) -> torch.Tensor: ...

    def embedding_store(
        self, indices: Sequence[int] | torch.Tensor, *, layer: int = ..., pooling: Any = ..., normalize: bool = ...
    ) -> FeatureStore: ...

    def target_embeddings(self, *, layer: int = ..., pooling: Any = ..., normalize: bool = ...) -> torch.Tensor: ...

    def gradient_features(
        self, indices: Sequence[int] | torch.Tensor, config: Any = ..., *, optimizer: Any = ...
    ) -> torch.Tensor: ...

    def gradient_feature_store(
        self, indices: Sequence[int] | torch.Tensor, config: Any = ..., *, optimizer: Any = ...
    ) -> FeatureStore: ...

    def expert_loads(
        self, indices: Sequence[int] | torch.Tensor, *, top_k: int | None = ..., desc: str = ...
    ) -> torch.Tensor: ...

    def policy_gradient_features(
        self,
        indices: Sequence[int] | torch.Tensor,
        config: Any,
        *,
        reward: Any,
        sampling: Any,
        seed: int,
        policy: nn.Module | None = ...,
    ) -> PolicyGradientFeatures: ...


class _NoModel:
    """Stands in for the model operations of an algorithm that declared it needs no model."""

    def __getattr__(self, name: str) -> Any:
        raise SteeringStateError(
            f"model operation {name!r} asked for by an algorithm that does not declare needs_model = True"
        )

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NO_MODEL"


#: The model operations of an algorithm with ``needs_model = False``.
NO_MODEL: ModelOperations = _NoModel()
