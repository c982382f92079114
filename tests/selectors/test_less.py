"""LESS: scores against a direct cosine computation, subtasks, and parameter checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError
from datasteer.rng import torch_generator
from datasteer.selectors.base import SelectContext
from datasteer.selectors.less import LessParams, LessSelector
from tests.factories import select_context

POOL = torch.randn(12, 5, generator=torch_generator(1, "pool"))


class FakeTarget:
    def __init__(self, features: torch.Tensor) -> None:
        self.features = features
        self.dataset = list(range(len(features)))

    def gradient_features(self, indices, config, optimizer=None) -> torch.Tensor:
        return self.features[torch.as_tensor(list(indices))]


class FakeOps:
    def __init__(self, *target_sets: torch.Tensor) -> None:
        self.targets = tuple(FakeTarget(t) for t in target_sets)
        self.optimizer = "live-optimizer"
        self.asked: list = []

    def gradient_features(self, indices, config, optimizer=None) -> torch.Tensor:
        self.asked.append((torch.as_tensor(indices).tolist(), optimizer))
        return POOL[torch.as_tensor(indices)]


def ctx(ops: FakeOps, n: int) -> SelectContext:
    return select_context(ops=ops, num_samples=n, pool_size=len(POOL))


def direct_scores(targets: torch.Tensor) -> torch.Tensor:
    return (F.normalize(POOL, dim=1) @ F.normalize(targets, dim=1).T).mean(dim=1)


def test_top_k_by_mean_cosine_with_the_targets() -> None:
    targets = torch.randn(3, 5, generator=torch_generator(2, "targets"))
    ops = FakeOps(targets)
    chosen = LessSelector(LessParams()).select(ctx(ops, 4))
    assert chosen.tolist() == torch.topk(direct_scores(targets), 4).indices.tolist()
    assert ops.asked[0][1] == "live-optimizer"  # candidates use the Adam-aware features


def test_the_best_subtask_counts() -> None:
    a = torch.randn(2, 5, generator=torch_generator(3, "a"))
    b = torch.randn(4, 5, generator=torch_generator(4, "b"))
    chosen = LessSelector(LessParams(adam=False)).select(ctx(FakeOps(a, b), 5))
    best = torch.maximum(direct_scores(a), direct_scores(b))
    assert chosen.tolist() == torch.topk(best, 5).indices.tolist()


def test_candidates_subset_and_no_targets() -> None:
    ops = FakeOps(torch.randn(2, 5, generator=torch_generator(5, "t")))
    chosen = LessSelector(LessParams(candidates=6, adam=False)).select(ctx(ops, 3))
    (asked, optimizer) = ops.asked[0]
    assert len(asked) == 6 and set(chosen.tolist()) <= set(asked) and optimizer is None
    with pytest.raises(ConfigError, match="evaluation set"):
        LessSelector(LessParams()).select(ctx(FakeOps(), 3))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"proj_dim": 0}, "proj_dim: must be >= 1"),
        ({"method": "fast"}, "method: 'fast' is not allowed"),
        ({"method": "logra"}, "cannot apply Adam"),
        ({"candidates": 0}, "candidates: must be >= 1"),
    ],
)
def test_bad_params(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_dataclass(LessParams, raw, "datasteer.params")
    assert message in str(err.value)
