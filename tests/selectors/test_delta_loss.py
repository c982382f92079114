"""Delta-loss selection: the sliding window and the draw, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError
from datasteer.selectors.delta_loss import DeltaLossParams, DeltaLossSelector, window_bounds
from tests.factories import select_context
from tests.fakes import FakeOps

SORTED = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.01])  # all positive


def test_window_slides_from_large_to_small_drops() -> None:
    p = DeltaLossParams(window_size=0.3)  # width 3 of 10
    assert window_bounds(SORTED, 0.0, p) == (int(7 / (1 + math.exp(5))), int(7 / (1 + math.exp(5))) + 3) == (0, 3)
    assert window_bounds(SORTED, 0.5, p) == (3, 6)  # 0.5 * 7 = 3.5
    assert window_bounds(SORTED, 1.0, p) == (6, 9)  # 0.9933 * 7 = 6.95


def test_window_ends_before_the_first_negative_delta() -> None:
    deltas = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, -1.0, -2.0, -3.0, -4.0])
    p = DeltaLossParams(window_size=0.3)
    assert window_bounds(deltas, 0.5, p) == (3, 6)
    assert window_bounds(deltas, 1.0, p) == (3, 6)  # would start at 6: slides back to end at 6
    assert window_bounds(-deltas.abs(), 0.5, p) == (0, 0)  # no loss dropped: empty window


def test_weights_mark_the_window_in_pool_order() -> None:
    selector = DeltaLossSelector(DeltaLossParams(window_size=0.3, outside_mass=0.1))
    deltas = torch.tensor([0.05, 5.0, 0.5, 2.0, 4.0, 1.0, 0.01, 3.0, 0.2, 0.1])
    weights = selector.weights(deltas, 0.5)  # window = sorted ranks 3..5 = deltas 2.0, 1.0, 0.5
    assert weights.tolist() == [0.1, 0.1, 1.0, 1.0, 0.1, 1.0, 0.1, 0.1, 0.1, 0.1]


@pytest.mark.parametrize(
    ("update", "total", "expected"),
    [(1, 5, 0.0), (4, 5, 1.0), (2, 5, 1 / 3), (1, 2, 0.0)],  # (1, 2): one delta update, no division by zero
)
def test_progress_runs_over_the_delta_updates_and_survives_a_single_one(
    update: int, total: int, expected: float
) -> None:
    ctx = select_context(num_samples=1, pool_size=10, update=update, total_updates=total)
    assert DeltaLossSelector.progress(ctx) == pytest.approx(expected)


def test_first_update_records_losses_then_selects_the_window() -> None:
    initial = torch.full((10,), 5.0)
    later = initial - torch.tensor([0.05, 5.0, 0.5, 2.0, 4.0, 1.0, 0.01, 3.0, 0.2, 0.1])
    ops = FakeOps(losses=[initial, later])  # the losses at update 0, then at update 1
    selector = DeltaLossSelector(DeltaLossParams(window_size=0.3, outside_mass=0.0))
    first = selector.select(select_context(ops=ops, num_samples=10, update=0, total_updates=3))
    assert sorted(first.tolist()) == list(range(10))  # uniform, without replacement
    torch.testing.assert_close(selector.initial_losses, initial)
    # update 1 of 3 -> progress 0: the window holds the three largest drops (indices 1, 4, 7)
    second = selector.select(select_context(ops=ops, num_samples=3, update=1, total_updates=3))
    assert sorted(second.tolist()) == [1, 4, 7]


def test_state_round_trip() -> None:
    a = DeltaLossSelector(DeltaLossParams())
    a.select(select_context(ops=FakeOps(losses=torch.arange(10.0)), num_samples=4, total_updates=3))
    b = DeltaLossSelector(DeltaLossParams())
    b.load_state_dict(a.state_dict())
    later = FakeOps(losses=torch.arange(10.0) - torch.linspace(0, 1, 10))
    ctx_a, ctx_b = (select_context(ops=later, num_samples=4, update=1, total_updates=3) for _ in "ab")
    assert torch.equal(a.select(ctx_a), b.select(ctx_b))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"window_size": 0}, "window_size: must be in (0, 1]"),
        ({"outside_mass": 2}, "outside_mass: must be in [0, 1]"),
        ({"sharpness": 0}, "sharpness: must be > 0"),
    ],
)
def test_bad_params(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_dataclass(DeltaLossParams, raw, "datasteer.params")
    assert message in str(err.value)


def test_a_window_cut_partly_by_negative_deltas_slides_back_whole() -> None:
    """100 samples, window 30, halfway (start 35): only 50 deltas are positive, so the window
    ends at 50 and starts at 20, still 30 wide (it used to shrink to [35, 50), 15 samples)."""
    deltas = torch.cat([torch.linspace(5.0, 0.1, 50), torch.linspace(-0.1, -5.0, 50)])
    params = DeltaLossParams(window_size=0.3)
    assert window_bounds(deltas, 0.5, params) == (20, 50)
    assert window_bounds(deltas, 0.0, params) == (0, 30)  # not cut: unchanged
    assert window_bounds(-deltas.abs(), 0.5, params) == (0, 0)  # no positive delta: empty


def test_non_finite_deltas_are_left_out_not_ranked() -> None:
    """A NaN delta was ranked last (outside_mass); an infinite L0 made its sample the largest drop."""
    selector = DeltaLossSelector(DeltaLossParams(window_size=0.5, outside_mass=0.1))
    nan, inf = float("nan"), float("inf")
    deltas = torch.tensor([nan, 5.0, inf, 2.0, 4.0, 1.0])
    # the window is half of the 4 finite deltas, the largest: 5.0 and 4.0
    assert selector.weights(deltas, 0.0).tolist() == [0.0, 1.0, 0.0, 0.1, 1.0, 0.1]


def test_updates_without_finite_losses_record_nothing_and_keep_the_selection() -> None:
    from datasteer.errors import NonFiniteInputError

    nan = float("nan")
    initial = torch.tensor([5.0, 5.0, nan, 5.0])
    ops = FakeOps(losses=[torch.full((4,), nan), initial, torch.tensor([4.0, 3.0, 1.0, nan]), torch.full((4,), nan)])
    selector = DeltaLossSelector(DeltaLossParams(window_size=0.5, outside_mass=0.0))
    with pytest.raises(NonFiniteInputError, match="L0 is not recorded"):
        selector.select(select_context(ops=ops, num_samples=2, update=0, total_updates=4))
    assert selector.initial_losses is None and selector.report() == {"nonfinite": 4}
    selector.select(select_context(ops=ops, num_samples=2, update=1, total_updates=4))  # records L0
    assert selector.report() == {"nonfinite": 1}
    chosen = selector.select(select_context(ops=ops, num_samples=1, update=2, total_updates=4))
    assert chosen.tolist() == [1] and selector.report() == {"nonfinite": 2}  # deltas 1, 2 (NaN 2, 3 left out)
    with pytest.raises(NonFiniteInputError, match="none of the 4 loss drops is finite"):
        selector.select(select_context(ops=ops, num_samples=1, update=3, total_updates=4))
