"""NEAR: neighbour lists by hand, progression across updates, exhaustion."""

from __future__ import annotations

import math

import pytest
import torch

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError
from datasteer.selectors.base import SelectContext
from datasteer.selectors.near import NearParams, NearSelector
from tests.factories import select_context


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


POOL = torch.tensor([unit(a) for a in (0, 10, 20, 90, 100, 180, 30, 85)])
TARGETS = torch.tensor([unit(4), unit(93)])
# By angle: target 0 -> 0, 1, 2, 6, 7, 3, 4, 5; target 1 -> 3, 4, 7, 6, 2, 1, 5, 0.


class FakeOps:
    def __init__(self) -> None:
        self.calls = 0

    def embeddings(self, indices, **kwargs) -> torch.Tensor:
        self.calls += 1
        return POOL[torch.as_tensor(indices)]

    def target_embeddings(self, **kwargs) -> torch.Tensor:
        return TARGETS


def ctx(ops: FakeOps, update: int, n: int) -> SelectContext:
    return select_context(ops=ops, num_samples=n, pool_size=len(POOL), update=update, total_updates=3)


def test_round_robin_over_neighbour_lists_moves_down_at_each_update() -> None:
    ops = FakeOps()
    near = NearSelector(NearParams(neighbours=4))
    # rank-major order of the lists [0, 1, 2, 6] and [3, 4, 7, 6]: 0, 3, 1, 4, 2, 7, 6, (6)
    assert near.select(ctx(ops, 0, 3)).tolist() == [0, 3, 1]
    assert near.select(ctx(ops, 1, 3)).tolist() == [4, 2, 7]
    assert ops.calls == 1  # embedded once (refresh: false)
    # 6 ends the lists; only sample 5 was never used, fewer than the 2 still needed, so a new
    # round starts and the rest are drawn at random, never repeating this update's picks.
    third = near.select(ctx(ops, 2, 3)).tolist()
    assert third[0] == 6 and len(set(third)) == 3


def test_state_round_trip_continues_down_the_lists() -> None:
    a = NearSelector(NearParams(neighbours=4))
    a.select(ctx(FakeOps(), 0, 3))
    b = NearSelector(NearParams(neighbours=4))
    b.load_state_dict(a.state_dict())
    assert b.select(ctx(FakeOps(), 1, 3)).tolist() == [4, 2, 7]


def test_refresh_re_embeds_every_update() -> None:
    ops = FakeOps()
    near = NearSelector(NearParams(neighbours=2, refresh=True))
    near.select(ctx(ops, 0, 2))
    near.select(ctx(ops, 1, 2))
    assert ops.calls == 2


def test_bad_params() -> None:
    with pytest.raises(ConfigError, match="neighbours: must be >= 1"):
        parse_dataclass(NearParams, {"neighbours": 0}, "datasteer.params")
