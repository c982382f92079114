"""Loss-tiered selection: tiers, focus, temperature and the draw, by hand."""

from __future__ import annotations

import logging

import pytest
import torch

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError
from datasteer.selectors.loss import LossSelector, LossSelectParams, tier_probabilities
from tests.factories import select_context
from tests.fakes import FakeOps

LOSSES = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
# torch.quantile (linear): q(0.33) = 2 + 0.65 = 2.65, q(0.66) = 4 + 0.3 = 4.3


def test_high_focus() -> None:
    probs = tier_probabilities(LOSSES, LossSelectParams(focus="high"))
    assert probs.tolist() == pytest.approx([1 / 14] * 4 + [5 / 14] * 2)


def test_low_and_medium_focus() -> None:
    low = tier_probabilities(LOSSES, LossSelectParams(focus="low", focus_weight=3.0))
    assert low.tolist() == pytest.approx([3 / 10, 3 / 10, 1 / 10, 1 / 10, 1 / 10, 1 / 10])
    medium = tier_probabilities(LOSSES, LossSelectParams(focus="medium"))
    assert medium.tolist() == pytest.approx([1 / 14, 1 / 14, 5 / 14, 5 / 14, 1 / 14, 1 / 14])


def test_temperature_flattens() -> None:
    probs = tier_probabilities(LOSSES, LossSelectParams(temperature=2.0))
    w = 5**0.5
    assert probs.tolist() == pytest.approx([1 / (4 + 2 * w)] * 4 + [w / (4 + 2 * w)] * 2)


def test_non_finite_losses_are_never_drawn() -> None:
    losses = torch.tensor([1.0, float("nan"), 3.0, float("inf"), 5.0])
    probs = tier_probabilities(losses, LossSelectParams())
    assert probs[1] == 0 and probs[3] == 0 and float(probs.sum()) == pytest.approx(1.0)


def test_draws_without_replacement_and_favours_the_focus_tier() -> None:
    losses = torch.arange(300, dtype=torch.float32)
    chosen = LossSelector(LossSelectParams(focus="high", focus_weight=20.0)).select(
        select_context(ops=FakeOps(losses=losses), num_samples=60)
    )
    assert len(set(chosen.tolist())) == 60
    high = (losses[chosen] > torch.quantile(losses, 0.66)).float().mean()
    assert high > 0.6  # expected share: 20 * 102 / (20 * 102 + 198) ~ 0.91 of the first draws
    again = LossSelector(LossSelectParams(focus="high", focus_weight=20.0)).select(
        select_context(ops=FakeOps(losses=losses), num_samples=60)
    )
    assert torch.equal(chosen, again)


def test_too_few_valid_losses_fall_back_to_replacement_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    losses = torch.tensor([1.0, float("nan"), 2.0, float("nan")])
    with caplog.at_level(logging.WARNING):
        chosen = LossSelector(LossSelectParams()).select(select_context(ops=FakeOps(losses=losses), num_samples=6))
    assert set(chosen.tolist()) <= {0, 2} and len(chosen) == 6
    assert "drawing with replacement" in caplog.text


def test_candidates_subset_is_scored_and_selected_from() -> None:
    ops = FakeOps(losses=torch.arange(100, dtype=torch.float32))
    chosen = LossSelector(LossSelectParams(candidates=10)).select(select_context(ops=ops, num_samples=5))
    (call,) = ops.calls
    assert len(call.indices) == 10 and set(chosen.tolist()) <= set(call.indices)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"focus": "hard"}, "focus: 'hard' is not allowed"),
        ({"focus_weight": 0}, "focus_weight: must be > 0"),
        ({"temperature": -1}, "temperature: must be > 0"),
        ({"quantiles": [0.7, 0.3]}, "quantiles: need 0 < low < high < 1"),
        ({"candidates": 0}, "candidates: must be >= 1"),
    ],
)
def test_bad_params(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_dataclass(LossSelectParams, raw, "datasteer.params")
    assert message in str(err.value)


def test_non_finite_losses_are_counted_and_none_finite_keeps_the_selection() -> None:
    from datasteer.errors import NonFiniteInputError

    selector = LossSelector(LossSelectParams())
    nan = float("nan")
    selector.select(select_context(ops=FakeOps(losses=torch.tensor([1.0, nan, 2.0, float("inf")])), num_samples=2))
    assert selector.report() == {"nonfinite": 2}
    with pytest.raises(NonFiniteInputError, match="none of the 3 candidates has a finite loss"):
        selector.select(select_context(ops=FakeOps(losses=torch.full((3,), nan)), num_samples=2))
    assert selector.report() == {"nonfinite": 3}
