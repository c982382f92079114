"""A test double of the model operations: fixed per-row answers, every call recorded.

:class:`FakeOps` implements :class:`~datasteer.ops.protocol.ModelOperations` (the same
Protocol as the live :class:`~datasteer.ops.ModelOps`), so an algorithm under test gets
the answers a test worked out by hand: row ``i``'s loss, reference loss, embedding, gradient
feature or expert loads is row ``i`` of a tensor the test supplies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from datasteer.errors import SteeringStateError
from datasteer.ops.embeddings import Pooling
from datasteer.ops.feature_store import FeatureStore
from datasteer.ops.gradients import GradFeatureConfig
from datasteer.ops.policy_gradient import PolicyGradientFeatures, Sampling
from datasteer.ops.rewards import RewardFn

#: One operation's answers: a tensor with one row per data set row, read by every call, or
#: a sequence of such tensors, the n-th read by the n-th call (a model that changes as it
#: trains between updates).
Answers = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class Call:
    """One call of a :class:`FakeOps` operation.

    Attributes:
        method: the operation's name, e.g. ``"gradient_features"``.
        indices: the rows asked for, in order.
        options: every other argument the operation was given, by name (e.g. ``optimizer``,
            ``config``, ``seed``).
    """

    method: str
    indices: list[int]
    options: dict[str, Any]


def live_optimizer() -> torch.optim.Optimizer:
    """A real optimizer over one parameter, standing in for the Trainer's (to check that an
    algorithm passes the live optimizer on)."""
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)


class FakeOps:
    """Model operations answered from fixed tensors, one row per row of the data set.

    Each operation reads its rows from the matching argument (or fails the test with a
    clear message if the test gave none). :meth:`target_embeddings` concatenates the target
    sets' embeddings, as the live operations do.

    Args:
        losses: per-row losses ``(n,)``, for :meth:`sample_losses`.
        reference_losses: per-row losses under the reference model ``(n,)``, for :meth:`reference_losses`.
        embeddings: ``(n, d)``, for :meth:`embeddings` and :meth:`embedding_store`.
        gradients: ``(n, d)``, for :meth:`gradient_features` and :meth:`gradient_feature_store`.
        policy_gradients: ``(n, d)``, for :meth:`policy_gradient_features` (an all-zero row: a
            target without reward signal).
        expert_loads: ``(n, layers, experts)`` counts, for :meth:`expert_loads`.
        targets: the target (evaluation) sets, each a fake of its own.
        dataset: the rows (what selectors that fingerprint the pool read); default
            ``list(range(n))`` with ``n`` the rows of the answers given.
        model: what ``ops.model`` is; default a bare module (give a real one to an
            algorithm that reads the model, e.g. its config or vocabulary).
        optimizer: the live optimizer, if any (see :func:`live_optimizer`).
        name: the data set's name (a target set's key, e.g. a domain).

    Attributes:
        calls: every call made on this fake, in order (a target set records its own).
    """

    model: nn.Module
    dataset: Any
    device: torch.device
    optimizer: torch.optim.Optimizer | None
    name: str | None

    def __init__(
        self,
        *,
        losses: Answers | None = None,
        reference_losses: Answers | None = None,
        embeddings: Answers | None = None,
        gradients: Answers | None = None,
        policy_gradients: Answers | None = None,
        expert_loads: Answers | None = None,
        targets: Sequence[FakeOps] = (),
        dataset: Any = None,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        name: str | None = None,
    ) -> None:
        given = {
            "sample_losses": losses,
            "reference_losses": reference_losses,
            "embeddings": embeddings,
            "gradient_features": gradients,
            "policy_gradient_features": policy_gradients,
            "expert_loads": expert_loads,
        }
        # method -> its answers, one tensor per call; a single tensor answers every call.
        self._answers = {m: _as_rounds(a) for m, a in given.items() if a is not None}
        self._per_call = {m for m, a in given.items() if a is not None and not isinstance(a, torch.Tensor)}
        if dataset is None:
            first = next(iter(self._answers.values()), [torch.empty(0)])
            dataset = list(range(len(first[0])))
        for method, rounds in self._answers.items():
            if any(len(r) != len(dataset) for r in rounds):
                raise ValueError(f"FakeOps: the answers of {method} need one row per data set row ({len(dataset)})")
        self.targets: tuple[FakeOps, ...] = tuple(targets)
        self.dataset = dataset
        self.model = model if model is not None else nn.Module()
        self.device = torch.device("cpu")
        self.optimizer = optimizer
        self.name = name
        self.calls: list[Call] = []
        self._reads: dict[str, int] = {}  # answers read so far, per source

    def calls_to(self, method: str) -> list[Call]:
        """The calls of one operation, in order."""
        return [c for c in self.calls if c.method == method]

    def _answer(
        self, method: str, indices: Sequence[int] | torch.Tensor, *, source: str | None = None, **options: Any
    ) -> torch.Tensor:
        """Rows ``indices`` of the answers of ``source`` (default: ``method``'s own)."""
        source = source or method
        rows = _rows(indices)
        done = self._reads.get(source, 0)
        self._reads[source] = done + 1
        self.calls.append(Call(method, rows.tolist(), options))
        rounds = self._answers.get(source)
        if rounds is None:
            raise AssertionError(f"FakeOps {self.name or '(pool)'}: the test gave no answers for {source}")
        if source not in self._per_call:
            return rounds[0][rows]
        if done >= len(rounds):
            raise AssertionError(
                f"FakeOps {self.name or '(pool)'}: {method} called {done + 1} times, answers for {len(rounds)}"
            )
        return rounds[done][rows]

    # -- the ModelOperations protocol --------------------------------------------------------------
    def subset(self, indices: Sequence[int] | torch.Tensor) -> FakeOps:
        """A fake over rows ``indices`` (renumbered from 0) with the same targets, model and
        optimizer; it records its calls separately."""
        rows = _rows(indices)
        fake = FakeOps(
            targets=self.targets,
            dataset=[self.dataset[i] for i in rows.tolist()],
            model=self.model,
            optimizer=self.optimizer,
            name=self.name,
        )
        fake._answers = {m: [r[rows] for r in rounds] for m, rounds in self._answers.items()}
        fake._per_call = set(self._per_call)
        return fake

    def sample_losses(self, indices: Sequence[int] | torch.Tensor, desc: str = "per-sample loss") -> torch.Tensor:
        return self._answer("sample_losses", indices, desc=desc)

    def reference_losses(self, indices: Sequence[int] | torch.Tensor, desc: str = "reference loss") -> torch.Tensor:
        return self._answer("reference_losses", indices, desc=desc)

    def embeddings(
        self,
        indices: Sequence[int] | torch.Tensor,
        *,
        layer: int = -1,
        pooling: Pooling = "mean",
        normalize: bool = True,
    ) -> torch.Tensor:
        return self._answer("embeddings", indices, layer=layer, pooling=pooling, normalize=normalize)

    def embedding_store(
        self,
        indices: Sequence[int] | torch.Tensor,
        *,
        layer: int = -1,
        pooling: Pooling = "mean",
        normalize: bool = True,
    ) -> FeatureStore:
        rows = self._answer(
            "embedding_store", indices, source="embeddings", layer=layer, pooling=pooling, normalize=normalize
        )
        return FeatureStore.from_tensor(rows)

    def target_embeddings(self, *, layer: int = -1, pooling: Pooling = "mean", normalize: bool = True) -> torch.Tensor:
        if not self.targets:
            raise SteeringStateError("this algorithm needs target samples: give the run an evaluation set")
        return torch.cat(
            [
                t.embeddings(range(len(t.dataset)), layer=layer, pooling=pooling, normalize=normalize)
                for t in self.targets
            ]
        )

    def gradient_features(
        self,
        indices: Sequence[int] | torch.Tensor,
        config: GradFeatureConfig | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> torch.Tensor:
        return self._answer("gradient_features", indices, config=config, optimizer=optimizer)

    def gradient_feature_store(
        self,
        indices: Sequence[int] | torch.Tensor,
        config: GradFeatureConfig | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> FeatureStore:
        rows = self._answer(
            "gradient_feature_store", indices, source="gradient_features", config=config, optimizer=optimizer
        )
        return FeatureStore.from_tensor(rows)

    def expert_loads(
        self, indices: Sequence[int] | torch.Tensor, *, top_k: int | None = None, desc: str = "expert loads"
    ) -> torch.Tensor:
        return self._answer("expert_loads", indices, top_k=top_k, desc=desc)

    def policy_gradient_features(
        self,
        indices: Sequence[int] | torch.Tensor,
        config: GradFeatureConfig,
        *,
        reward: RewardFn,
        sampling: Sampling,
        seed: int,
        policy: nn.Module | None = None,
    ) -> PolicyGradientFeatures:
        rows = self._answer(
            "policy_gradient_features",
            indices,
            config=config,
            reward=reward,
            sampling=sampling,
            seed=seed,
            policy=policy,
        )
        # the fake's rows stand for the gradients: an all-zero row is a target without signal
        return PolicyGradientFeatures(rows, rows.abs().sum(dim=1) == 0)


def _as_rounds(answers: Answers) -> list[torch.Tensor]:
    return [answers] if isinstance(answers, torch.Tensor) else list(answers)


def _rows(indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(indices if isinstance(indices, torch.Tensor) else list(indices), dtype=torch.long)
