"""NEAR: neighbour lists by hand, progression across updates, exhaustion."""

from __future__ import annotations

import math

import pytest
import torch

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError
from datasteer.selectors.near import NearParams, NearSelector
from tests.factories import select_context
from tests.fakes import FakeOps


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


POOL = torch.tensor([unit(a) for a in (0, 10, 20, 90, 100, 180, 30, 85)])
TARGETS = torch.tensor([unit(4), unit(93)])
# By angle: target 0 -> 0, 1, 2, 6, 7, 3, 4, 5; target 1 -> 3, 4, 7, 6, 2, 1, 5, 0.


def fake_ops() -> FakeOps:
    return FakeOps(embeddings=POOL, targets=[FakeOps(embeddings=TARGETS)])


def test_round_robin_over_neighbour_lists_moves_down_at_each_update() -> None:
    ops = fake_ops()
    near = NearSelector(NearParams(neighbours=4))
    # rank-major order of the lists [0, 1, 2, 6] and [3, 4, 7, 6]: 0, 3, 1, 4, 2, 7, 6, (6)
    assert near.select(select_context(ops=ops, num_samples=3, update=0)).tolist() == [0, 3, 1]
    assert near.select(select_context(ops=ops, num_samples=3, update=1)).tolist() == [4, 2, 7]
    assert len(ops.calls_to("embedding_store")) == 1  # embedded once (refresh: false)
    # 6 ends the lists; only sample 5 was never used, fewer than the 2 still needed, so a new
    # round starts and the rest are drawn at random, never repeating this update's picks.
    third = near.select(select_context(ops=ops, num_samples=3, update=2)).tolist()
    assert third[0] == 6 and len(set(third)) == 3


def test_state_round_trip_continues_down_the_lists() -> None:
    a = NearSelector(NearParams(neighbours=4))
    a.select(select_context(ops=fake_ops(), num_samples=3, update=0))
    b = NearSelector(NearParams(neighbours=4))
    b.load_state_dict(a.state_dict())
    assert b.select(select_context(ops=fake_ops(), num_samples=3, update=1)).tolist() == [4, 2, 7]


def test_refresh_re_embeds_every_update() -> None:
    ops = fake_ops()
    near = NearSelector(NearParams(neighbours=2, refresh=True))
    near.select(select_context(ops=ops, num_samples=2, update=0))
    near.select(select_context(ops=ops, num_samples=2, update=1))
    assert len(ops.calls_to("embedding_store")) == 2


def test_refreshed_lists_start_from_their_best_unused_neighbours() -> None:
    """After a refresh the new lists are read from the top (minus what was served), not from
    where the old lists' cursor stood."""
    moved = POOL.clone()
    moved[[5, 3]] = moved[[3, 5]]  # the model changed: sample 5 now sits where 3 was (93 deg)
    ops = FakeOps(embeddings=[POOL, moved], targets=[FakeOps(embeddings=TARGETS)])
    near = NearSelector(NearParams(neighbours=4, refresh=True))
    assert near.select(select_context(ops=ops, num_samples=3, update=0)).tolist() == [0, 3, 1]
    # new lists: target 0 -> 0, 1, 2, 6; target 1 -> 5, 4, 7, 6; rank-major 0, 5, 1, 4, 2, 7, ...
    # unused: 5, 4, 2 (the old cursor, at position 3, would skip the new best neighbour 5)
    assert near.select(select_context(ops=ops, num_samples=3, update=1)).tolist() == [5, 4, 2]


def test_a_saved_state_does_not_move_with_later_updates() -> None:
    near = NearSelector(NearParams(neighbours=4))
    near.select(select_context(ops=fake_ops(), num_samples=3, update=0))
    state = near.state_dict()
    near.select(select_context(ops=fake_ops(), num_samples=3, update=1))
    assert state["used"].nonzero().flatten().tolist() == [0, 1, 3]


def test_bad_params() -> None:
    with pytest.raises(ConfigError, match="neighbours: must be >= 1"):
        parse_dataclass(NearParams, {"neighbours": 0}, "datasteer.params")


def test_embeddings_that_are_not_finite_are_left_out_of_the_lists() -> None:
    from datasteer.errors import NonFiniteInputError

    nan = float("nan")
    pool = POOL.clone()
    pool[1] = torch.tensor([nan, 0.0])
    targets = torch.cat([TARGETS, torch.tensor([[float("inf"), 1.0]])])
    ops = FakeOps(embeddings=pool, targets=[FakeOps(embeddings=targets)])
    near = NearSelector(NearParams(neighbours=3))
    # lists without sample 1: [0, 2, 6] and [3, 4, 7]; the infinite target has none
    assert near.select(select_context(ops=ops, num_samples=6, update=0)).tolist() == [0, 3, 2, 4, 6, 7]
    assert near.report() == {"nonfinite": 2}
    near.select(select_context(ops=ops, num_samples=1, update=1))
    assert near.report() == {"nonfinite": 0}  # the lists were not rebuilt
    nothing = FakeOps(embeddings=torch.full((8, 2), nan), targets=[FakeOps(embeddings=TARGETS)])
    with pytest.raises(NonFiniteInputError, match="no finite embedding"):
        NearSelector(NearParams()).select(select_context(ops=nothing, num_samples=2))
