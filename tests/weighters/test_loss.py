"""LossWeighter (Sow et al., ICLR 2025): each strategy's weights on a hand-checked loss vector."""

from __future__ import annotations

import math

import pytest
import torch

from datasteer.weighters.loss import LossWeighter, LossWeightParams
from tests.factories import weight_context

LOSSES = torch.tensor([1.0, 2.0, 3.0, 5.0])
# min 1, max 5: n = (2 l - 6) / 4 * delta = [-1, -0.5, 0, 1] for delta = 1
SCORES = {
    "linupper": [0.0, 0.5, 1.0, 1.0],  # min(n + 1, 1)
    "uniform": [-1.0, -0.5, 0.0, 1.0],  # n
    "quadratic": [0.0, 0.75, 1.0, 0.0],  # 1 - n^2
    "extremes": [1.0, 0.5, 0.0, 1.0],  # |n|
}


def softmax_times_n(scores: list[float], r: float) -> list[float]:
    exp = [math.exp(s / r) for s in scores]
    return [len(scores) * e / sum(exp) for e in exp]


@pytest.mark.parametrize("strategy", sorted(SCORES))
def test_strategy_weights_by_hand(strategy: str) -> None:
    weighter = LossWeighter(LossWeightParams(strategy=strategy))  # type: ignore[arg-type]
    torch.testing.assert_close(weighter.scores(LOSSES), torch.tensor(SCORES[strategy], dtype=torch.float64))
    weights = weighter.weigh(weight_context(LOSSES))
    torch.testing.assert_close(weights, torch.tensor(softmax_times_n(SCORES[strategy], 1.0), dtype=torch.float64))
    assert float(weights.mean()) == pytest.approx(1.0)


def test_delta_and_temperature() -> None:
    weighter = LossWeighter(LossWeightParams(strategy="uniform", delta=2.0, temperature=0.5))
    # n = [-2, -1, 0, 2]; scores / r = [-4, -2, 0, 4]
    expected = softmax_times_n([-2.0, -1.0, 0.0, 2.0], 0.5)
    torch.testing.assert_close(weighter.weigh(weight_context(LOSSES)), torch.tensor(expected, dtype=torch.float64))
    # the weighted loss (1/b) sum w l is the paper's sum softmax_i l_i
    w = weighter.weigh(weight_context(LOSSES))
    soft = torch.softmax(torch.tensor([-4.0, -2.0, 0.0, 4.0], dtype=torch.float64), 0)
    assert float((w * LOSSES).mean()) == pytest.approx(float((soft * LOSSES).sum()))


def test_linupper_favours_high_losses_and_caps_them() -> None:
    w = LossWeighter(LossWeightParams()).weigh(weight_context(LOSSES))
    assert w[0] < w[1] < w[2] and w[2] == w[3]


def test_equal_losses_give_uniform_weights() -> None:
    for strategy in SCORES:
        w = LossWeighter(LossWeightParams(strategy=strategy)).weigh(weight_context(torch.full((3,), 2.5)))  # type: ignore[arg-type]
        torch.testing.assert_close(w, torch.ones(3, dtype=torch.float64))


def test_temperature_schedule_is_linear_over_steps() -> None:
    weighter = LossWeighter(LossWeightParams(temperature=2.0, temperature_end=0.5))
    assert [weighter.temperature(s, 4) for s in (1, 2, 3, 4)] == pytest.approx([2.0, 1.5, 1.0, 0.5])
    fixed = LossWeighter(LossWeightParams(temperature=2.0))
    assert fixed.temperature(1, 4) == fixed.temperature(4, 4) == 2.0
    expected = softmax_times_n(SCORES["linupper"], 0.5)
    torch.testing.assert_close(
        weighter.weigh(weight_context(LOSSES, step=4, max_steps=4)), torch.tensor(expected).double()
    )


@pytest.mark.parametrize("bad", [{"delta": 0.0}, {"temperature": -1.0}, {"temperature_end": 0.0}])
def test_bad_params(bad: dict) -> None:
    from datasteer.errors import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        LossWeightParams(**bad)


def test_huge_finite_losses_and_a_tiny_temperature_keep_the_weights_finite() -> None:
    """2 l - (max + min) overflowed for losses near the float64 limit; f(n) / r overflowed for a tiny r."""
    huge = torch.tensor([1e308, 1.7e308, 0.0], dtype=torch.float64)
    scores = LossWeighter(LossWeightParams(strategy="uniform")).scores(huge)
    assert torch.isfinite(scores).all() and scores[2] == -1.0 and scores[1] == 1.0
    w = LossWeighter(LossWeightParams(temperature=1e-320)).weigh(weight_context(LOSSES))
    assert torch.isfinite(w).all() and float(w.sum()) == pytest.approx(len(LOSSES))
