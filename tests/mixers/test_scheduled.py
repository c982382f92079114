"""Tests of the scheduled mixer: piecewise-linear proportions over steps."""

from __future__ import annotations

import pytest
import torch

from datasteer.config import load_steering
from datasteer.errors import ConfigError
from datasteer.mixers.scheduled import ScheduledMixer
from tests.factories import mix_context


def mixer(schedule: list) -> ScheduledMixer:
    config = load_steering({"paradigm": "mix", "algorithm": "scheduled", "params": {"schedule": schedule}})
    return ScheduledMixer(config.stages["mix"].params)


def close(got: torch.Tensor, expected: list[float]) -> bool:
    return got.dtype == torch.float64 and torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_two_points() -> None:
    m = mixer([[0, [1, 0]], [10, [0, 1]]])
    assert close(m.at(0), [1.0, 0.0])
    assert close(m.at(5), [0.5, 0.5])
    assert close(m.at(2), [0.8, 0.2])
    assert close(m.at(10), [0.0, 1.0])


def test_three_points() -> None:
    m = mixer([[2, [1, 0, 0]], [6, [0, 1, 0]], [10, [0, 0.5, 0.5]]])
    assert close(m.at(3), [0.75, 0.25, 0.0])
    assert close(m.at(6), [0.0, 1.0, 0.0])
    assert close(m.at(7), [0.0, 0.875, 0.125])  # a quarter of the way from [0,1,0] to [0,.5,.5]
    assert close(m.at(9), [0.0, 0.625, 0.375])


def test_clamped_before_the_first_and_after_the_last_point() -> None:
    m = mixer([[4, [0.2, 0.8]], [8, [0.6, 0.4]]])
    assert close(m.at(0), [0.2, 0.8])
    assert close(m.at(3), [0.2, 0.8])
    assert close(m.at(9), [0.6, 0.4])
    assert close(m.at(1000), [0.6, 0.4])


def test_single_point_is_constant() -> None:
    m = mixer([[5, [0.3, 0.7]]])
    assert close(m.at(1), [0.3, 0.7])
    assert close(m.at(50), [0.3, 0.7])


def test_update_and_initial_use_the_first_step_they_shape() -> None:
    m = mixer([[0, [1, 0]], [10, [0, 1]]])
    assert close(m.initial(mix_context(k=2, first_step=1)), [0.9, 0.1])
    assert close(m.update(mix_context(k=2, step=2, first_step=4)), [0.6, 0.4])


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ([[0, [1, 0]], [0, [0, 1]]], r"^datasteer\.params\.schedule: steps must increase strictly, got \[0, 0\]"),
        ([[5, [1, 0]], [3, [0, 1]]], r"^datasteer\.params\.schedule: steps must increase strictly, got \[5, 3\]"),
        ([[-1, [1, 0]]], r"^datasteer\.params\.schedule: steps must be >= 0"),
        ([], r"^datasteer\.params\.schedule: give at least one"),
        ([[0, [1, 0]], [5, [0.5, 0.25, 0.25]]], r"^datasteer\.params\.schedule\[1\]: expected 2 proportions"),
        ([[0, [1, 0]], [5, [0.5, 0.6]]], r"^datasteer\.params\.schedule\[1\]: proportions must sum to 1"),
        ([[0, [1.5, -0.5]]], r"^datasteer\.params\.schedule\[0\]: proportions must be finite and >= 0"),
        ([[0.5, [1, 0]]], r"^datasteer\.params\.schedule\[0\]\[0\]: expected an integer"),
        ([[0, [1, 0], 3]], r"^datasteer\.params\.schedule\[0\]: expected 2 items, got 3"),
    ],
)
def test_invalid_schedules(schedule: list, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        mixer(schedule)


def test_schedule_is_required() -> None:
    with pytest.raises(ConfigError, match=r"^datasteer\.params\.schedule: required key is missing"):
        load_steering({"paradigm": "mix", "algorithm": "scheduled"})


def test_width_must_match_the_domains() -> None:
    m = mixer([[0, [1, 0]], [10, [0, 1]]])
    m.check_domains(("a", "b"))
    with pytest.raises(ConfigError, match=r"^datasteer\.params\.schedule\[0\]: expected 3 proportions"):
        m.check_domains(("a", "b", "c"))
