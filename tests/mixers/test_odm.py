"""ODM (EXP3) update rules against values computed by hand, for both reward estimators."""

from __future__ import annotations

import math

import pytest
import torch

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.mixers.base import DomainStats
from datasteer.mixers.odm import ODMMixer, ODMParams
from tests.factories import mix_context

NAMES = ("a", "b", "c")


def stats(step: int, proportions: list[float], samples: list[float], loss_sum: list[float]) -> DomainStats:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return DomainStats(step, t(proportions), t(samples), t(loss_sum), t(samples) * 10, t(loss_sum) * 10)


def softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def two_steps(params: ODMParams) -> ODMMixer:
    mixer = ODMMixer(params)
    # step 1: mean losses 2, 1; domain c absent (no samples)
    mixer.observe(stats(1, [0.5, 0.3, 0.2], [5, 3, 0], [10.0, 3.0, 0.0]))
    # step 2: mean losses 3, 1, 2
    mixer.observe(stats(2, [0.25, 0.25, 0.5], [1, 1, 2], [3.0, 1.0, 4.0]))
    return mixer


def eps(t: int, k: int = 3) -> float:
    return min(1 / k, math.sqrt(math.log(k) / (k * t)))


# --- estimator: full (mixed batches) ---------------------------------------------------------


def test_full_estimates_are_bias_corrected_smoothed_exp_losses() -> None:
    mixer = ODMMixer(ODMParams(alpha=0.9))
    mixer.observe(stats(1, [0.5, 0.3, 0.2], [5, 3, 0], [10.0, 3.0, 0.0]))
    # R = 0.1 e^r for the trained domains; corrected by 1 / (1 - 0.9): log R = r; c never trained
    got = mixer.report()["reward_estimates"]
    assert got[:2].tolist() == pytest.approx([2.0, 1.0])
    assert got[2] == -math.inf
    mixer.observe(stats(2, [0.25, 0.25, 0.5], [1, 1, 2], [3.0, 1.0, 4.0]))
    # a, b: (0.9 * 0.1 e^r1 + 0.1 e^r2) / (1 - 0.81); c: 0.1 e^2 / (1 - 0.9)
    expected = [(0.09 * math.e**2 + 0.1 * math.e**3) / 0.19, (0.09 * math.e + 0.1 * math.e) / 0.19, math.e**2]
    assert torch.exp(mixer.report()["reward_estimates"]).tolist() == pytest.approx(expected)


def test_full_proportions_follow_the_estimates_with_step_based_exploration() -> None:
    mixer = two_steps(ODMParams(alpha=0.9))
    r = [(0.09 * math.e**2 + 0.1 * math.e**3) / 0.19, math.e, math.e**2]
    for t in (1, 2, 3):  # eps_t = 1/3: all mass is exploration
        assert mixer.update(mix_context(names=NAMES, first_step=t)).tolist() == pytest.approx([1 / 3] * 3)
    for t in (4, 40):
        expected = [(1 - 3 * eps(t)) * v / sum(r) + eps(t) for v in r]
        # t is the step the proportions are for, whatever the update index (update_every > 1)
        got = mixer.update(mix_context(names=NAMES, first_step=t, update=1))
        assert got.tolist() == pytest.approx(expected)
        assert float(got.sum()) == pytest.approx(1.0)
    assert got[0] > got[2] > got[1]  # the hardest domain gets the most mass


def test_full_a_domain_first_trained_late_is_not_under_rated() -> None:
    mixer = ODMMixer(ODMParams(alpha=0.9))
    for step in range(1, 21):
        mixer.observe(stats(step, [0.5, 0.5, 0.0], [4, 4, 0], [8.0, 8.0, 0.0]))
    mixer.observe(stats(21, [0.4, 0.4, 0.2], [4, 4, 2], [8.0, 8.0, 4.0]))
    # all three domains have mean loss 2: equal corrected estimates, whatever their counts
    assert mixer.report()["reward_estimates"].tolist() == pytest.approx([2.0, 2.0, 2.0])


def test_full_fixed_losses_move_mass_to_the_hardest_domain() -> None:
    """The case that stayed at uniform: fixed losses (6.3, 6.6, 4.1, 6.7), 150 mixed steps."""
    losses = [6.3, 6.6, 4.1, 6.7]
    mixer = ODMMixer(ODMParams())
    proportions = [0.25] * 4
    for step in range(1, 151):
        samples = [8.0] * 4
        mixer.observe(stats(step, proportions, samples, [8 * v for v in losses]))
        proportions = mixer.update(mix_context(names=("p", "c", "a", "n"), first_step=step + 1)).tolist()
    e = eps(151, 4)
    assert proportions == pytest.approx([(1 - 4 * e) * s + e for s in softmax(losses)])
    assert proportions[3] > proportions[1] > proportions[0] > proportions[2]
    assert 0.25 - proportions[2] > 0.1  # arithmetic (lowest loss) loses more than 0.1


def test_reward_scale_and_clip_set_the_temperature() -> None:
    mixer = ODMMixer(ODMParams(alpha=0.0, reward_scale=2.0, reward_clip=(0.0, 3.0)))
    mixer.observe(stats(1, [0.5, 0.25, 0.25], [1, 1, 1], [2.0, 1.0, 0.5]))
    # scaled [4, 2, 1] -> clipped [3, 2, 1]; alpha 0 keeps only this step
    assert mixer.report()["reward_estimates"].tolist() == pytest.approx([3.0, 2.0, 1.0])
    got = mixer.update(mix_context(names=NAMES, first_step=100))
    assert got.tolist() == pytest.approx([(1 - 3 * eps(100)) * s + eps(100) for s in softmax([3.0, 2.0, 1.0])])


def test_before_any_step_the_proportions_are_uniform() -> None:
    mixer = ODMMixer(ODMParams())
    assert mixer.update(mix_context(names=NAMES, first_step=1)).tolist() == pytest.approx([1 / 3] * 3)
    assert mixer.report() == {}


# --- estimator: importance (the paper's Algorithm 1) -------------------------------------------


def test_importance_estimates_are_share_weighted_rewards_over_proportions() -> None:
    mixer = ODMMixer(ODMParams(estimator="importance", alpha=0.9))
    mixer.observe(stats(1, [0.5, 0.3, 0.2], [5, 3, 0], [10.0, 3.0, 0.0]))
    # share [5/8, 3/8, 0] * r [2, 1, -] / pi [0.5, 0.3, -] = [2.5, 1.25, 0]; R = 0.1 * that
    assert mixer.estimates.tolist() == pytest.approx([0.25, 0.125, 0.0])
    mixer.observe(stats(2, [0.25, 0.25, 0.5], [1, 1, 2], [3.0, 1.0, 4.0]))
    # share [1/4, 1/4, 1/2] * r [3, 1, 2] / pi [1/4, 1/4, 1/2] = [3, 1, 2]; R = 0.9 R + 0.1 * that
    assert mixer.estimates.tolist() == pytest.approx([0.525, 0.2125, 0.2])
    assert mixer.report()["reward_estimates"].tolist() == mixer.estimates.tolist()


def test_importance_one_domain_step_is_the_papers_update() -> None:
    mixer = ODMMixer(ODMParams(estimator="importance", alpha=0.5))
    mixer.observe(stats(1, [0.5, 0.25, 0.25], [0, 8, 0], [0.0, 16.0, 0.0]))
    assert mixer.estimates.tolist() == pytest.approx([0.0, 0.5 * 2 / 0.25, 0.0])  # r / pi for the sampled arm


def test_importance_proportions_follow_softmax_of_scaled_estimates() -> None:
    mixer = two_steps(ODMParams(estimator="importance", alpha=0.9))
    for t in (1, 2, 3):
        assert mixer.update(mix_context(names=NAMES, first_step=t)).tolist() == pytest.approx([1 / 3] * 3)
    expected = [(1 - 3 * eps(4)) * p + eps(4) for p in softmax([eps(3) * r for r in (0.525, 0.2125, 0.2)])]
    assert mixer.update(mix_context(names=NAMES, first_step=4, update=1)).tolist() == pytest.approx(expected)


def test_importance_with_mixed_batches_flattens_to_uniform() -> None:
    """Why 'full' is the default: with mixed batches the bounded estimate meets a shrinking eps."""
    mixer = ODMMixer(ODMParams(estimator="importance"))
    proportions = [0.25] * 4
    for step in range(1, 151):
        mixer.observe(stats(step, proportions, [8.0] * 4, [8 * v for v in (6.3, 6.6, 4.1, 6.7)]))
        proportions = mixer.update(mix_context(names=("p", "c", "a", "n"), first_step=step + 1)).tolist()
    assert max(abs(p - 0.25) for p in proportions) < 0.03


# --- state --------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["full", "importance"])
def test_state_round_trip_continues_identically(estimator: str) -> None:
    a = two_steps(ODMParams(estimator=estimator))
    b = ODMMixer(ODMParams(estimator=estimator))
    b.load_state_dict(a.state_dict())
    extra = stats(3, [0.2, 0.3, 0.5], [2, 2, 4], [1.0, 5.0, 2.0])
    a.observe(extra)
    b.observe(extra)
    ctx = mix_context(names=NAMES, first_step=7)
    assert torch.equal(a.update(ctx), b.update(ctx))
    assert b.steps_observed == 3


def test_state_of_another_estimator_is_refused() -> None:
    state = two_steps(ODMParams(estimator="importance")).state_dict()
    with pytest.raises(SteeringStateError, match=r"estimator 'importance'.*resume with estimator: importance"):
        ODMMixer(ODMParams(estimator="full")).load_state_dict(state)
    legacy = {"estimates": torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64), "steps_observed": 4}
    old = ODMMixer(ODMParams(estimator="importance"))
    old.load_state_dict(legacy)  # a state from before the estimator existed: importance
    assert old.counts.tolist() == [4, 4, 4]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"estimator": "sampled"}, "estimator: 'sampled' is not allowed; choose one of 'full', 'importance'"),
        ({"alpha": 1.0}, "alpha: must be in [0, 1)"),
        ({"reward_scale": 0}, "reward_scale: must be > 0"),
        ({"reward_clip": [1, 0]}, "reward_clip: needs low <= high"),
        ({"min_exploration": -0.1}, "min_exploration: must be >= 0"),
    ],
)
def test_bad_params(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_dataclass(ODMParams, raw, "datasteer.params")


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


@pytest.mark.parametrize("estimator", ["full", "importance"])
def test_a_domain_without_a_finite_reward_is_treated_as_not_trained(estimator: str) -> None:
    """A NaN reward once became 0 (nan_to_num) and an infinite one made the proportions NaN."""
    params = ODMParams(alpha=0.9, estimator=estimator)  # type: ignore[arg-type]
    mixer = ODMMixer(params)
    mixer.observe(stats(1, [0.4, 0.3, 0.3], [4, 3, 3], [8.0, 3.0, 6.0]))
    before = mixer.estimates.clone()
    # a: an overflowed loss sum; b: NaN; c: finite
    mixer.observe(stats(2, [0.4, 0.3, 0.3], [4, 3, 3], [math.inf, math.nan, 6.0]))
    reference = ODMMixer(params)
    reference.observe(stats(1, [0.4, 0.3, 0.3], [4, 3, 3], [8.0, 3.0, 6.0]))
    reference.observe(stats(2, [0.4, 0.3, 0.3], [0, 0, 3], [0.0, 0.0, 6.0]))  # as if only c trained
    assert torch.equal(mixer.estimates, reference.estimates) and torch.equal(mixer.counts, reference.counts)
    if estimator == "full":
        assert mixer.estimates[:2].tolist() == before[:2].tolist()
    proportions = mixer.update(mix_context(k=3, first_step=8))
    assert torch.isfinite(proportions).all() and float(proportions.sum()) == pytest.approx(1.0)


def test_a_step_without_any_finite_reward_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    mixer = ODMMixer(ODMParams(estimator="importance"))
    mixer.observe(stats(1, [0.4, 0.3, 0.3], [4, 3, 3], [8.0, 3.0, 6.0]))
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in mixer.state_dict().items()}
    # finite losses whose importance estimates overflow: 1e300 / 1e-12
    mixer.observe(stats(2, [1e-12, 0.5, 0.5], [1, 0, 0], [1e300, 0.0, 0.0]))
    assert "no domain of step 2 has a finite reward" in caplog.text
    assert all(
        torch.equal(v, state[k]) if isinstance(v, torch.Tensor) else v == state[k]
        for k, v in mixer.state_dict().items()
    )
