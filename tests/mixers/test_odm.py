"""ODM (EXP3) update rules against values computed by hand for 3 domains."""

from __future__ import annotations

import math

import pytest
import torch

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError
from datasteer.mixers.base import DomainStats
from datasteer.mixers.odm import ODMMixer, ODMParams
from tests.factories import mix_context

NAMES = ("a", "b", "c")


def stats(step: int, proportions: list[float], samples: list[float], loss_sum: list[float]) -> DomainStats:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return DomainStats(step, t(proportions), t(samples), t(loss_sum), t(samples) * 10, t(loss_sum) * 10)


def softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def two_steps(params: ODMParams) -> ODMMixer:
    mixer = ODMMixer(params)
    # step 1: domain c absent (no samples): its EXP3 reward estimate is 0
    mixer.observe(stats(1, [0.5, 0.3, 0.2], [5, 3, 0], [10.0, 3.0, 0.0]))
    # step 2: mean losses 3, 1, 2
    mixer.observe(stats(2, [0.25, 0.25, 0.5], [1, 1, 2], [3.0, 1.0, 4.0]))
    return mixer


def test_estimates_are_smoothed_importance_weighted_rewards() -> None:
    mixer = ODMMixer(ODMParams(alpha=0.9))
    mixer.observe(stats(1, [0.5, 0.3, 0.2], [5, 3, 0], [10.0, 3.0, 0.0]))
    # r = [2, 1, -]; r / pi = [4, 3.333.., 0]; R = 0.1 * that
    assert mixer.estimates.tolist() == pytest.approx([0.4, 1 / 3 * 10 * 0.1, 0.0])
    mixer.observe(stats(2, [0.25, 0.25, 0.5], [1, 1, 2], [3.0, 1.0, 4.0]))
    # R = 0.9 R + 0.1 * [12, 4, 4]
    assert mixer.estimates.tolist() == pytest.approx([0.36 + 1.2, 0.3 + 0.4, 0.4])
    assert mixer.report()["reward_estimates"].tolist() == mixer.estimates.tolist()  # written to each record


def test_exploration_schedule() -> None:
    mixer = ODMMixer(ODMParams())
    assert mixer.exploration(0, 3) == pytest.approx(1 / 3)
    for t in (1, 2, 3):  # sqrt(ln 3 / (3 t)) >= 1/3 for t <= 3
        assert mixer.exploration(t, 3) == pytest.approx(1 / 3)
    assert mixer.exploration(4, 3) == pytest.approx(math.sqrt(math.log(3) / 12))
    assert mixer.exploration(100, 3) == pytest.approx(math.sqrt(math.log(3) / 300))
    floored = ODMMixer(ODMParams(min_exploration=0.2))
    assert floored.exploration(100, 3) == pytest.approx(0.2)
    assert ODMMixer(ODMParams(min_exploration=0.9)).exploration(100, 3) == pytest.approx(1 / 3)


def test_early_updates_are_uniform_then_follow_the_estimates() -> None:
    mixer = two_steps(ODMParams(alpha=0.9))
    for update in (0, 1, 2):  # eps_t = 1/3: all mass is exploration
        assert mixer.update(mix_context(names=NAMES, update=update)).tolist() == pytest.approx([1 / 3] * 3)
    eps, eps_prev = math.sqrt(math.log(3) / 12), 1 / 3
    expected = [(1 - 3 * eps) * p + eps for p in softmax([eps_prev * r for r in (1.56, 0.7, 0.4)])]
    got = mixer.update(mix_context(names=NAMES, update=3))
    assert got.tolist() == pytest.approx(expected)
    assert float(got.sum()) == pytest.approx(1.0)
    assert got[0] > got[1] > got[2]  # the hardest domain gets the most mass


def test_reward_scale_and_clip() -> None:
    mixer = ODMMixer(ODMParams(alpha=0.0, reward_scale=2.0, reward_clip=(0.0, 3.0)))
    mixer.observe(stats(1, [0.5, 0.25, 0.25], [1, 1, 1], [2.0, 1.0, 0.5]))
    # scaled [4, 2, 1] -> clipped [3, 2, 1] -> / pi
    assert mixer.estimates.tolist() == pytest.approx([6.0, 8.0, 4.0])


def test_state_round_trip_continues_identically() -> None:
    a = two_steps(ODMParams())
    b = ODMMixer(ODMParams())
    b.load_state_dict(a.state_dict())
    extra = stats(3, [0.2, 0.3, 0.5], [2, 2, 4], [1.0, 5.0, 2.0])
    a.observe(extra)
    b.observe(extra)
    assert torch.equal(a.update(mix_context(names=NAMES, update=7)), b.update(mix_context(names=NAMES, update=7)))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"alpha": 1.0}, "alpha: must be in [0, 1)"),
        ({"reward_scale": 0}, "reward_scale: must be > 0"),
        ({"reward_clip": [1, 0]}, "reward_clip: needs low <= high"),
        ({"min_exploration": -0.1}, "min_exploration: must be >= 0"),
    ],
)
def test_bad_params(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_dataclass(ODMParams, raw, "datasteer.params")
