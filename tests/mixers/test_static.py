"""Tests of the static mixer: fixed proportions, validated against the domains."""

from __future__ import annotations

import pytest
import torch

from datasteer.config import load_steering
from datasteer.errors import ConfigError
from datasteer.mixers.static import StaticMixer, StaticParams
from tests.factories import mix_context

NAMES = ("a", "b", "c", "d")


def test_default_is_uniform() -> None:
    mixer = StaticMixer(StaticParams())
    assert torch.equal(mixer.initial(mix_context(k=4)), torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64))
    assert torch.equal(mixer.update(mix_context(k=2)), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_given_proportions_are_served_unchanged() -> None:
    mixer = StaticMixer(StaticParams(proportions=[0.1, 0.2, 0.3, 0.4]))
    mixer.check_domains(NAMES)
    expected = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    assert torch.equal(mixer.initial(mix_context(names=NAMES)), expected)
    for update in range(3):
        assert torch.equal(mixer.update(mix_context(names=NAMES, update=update)), expected)


def test_is_not_adaptive() -> None:
    # The controller skips updates of non-adaptive mixers: the initial proportions hold all run.
    assert StaticMixer.adaptive is False


def test_wrong_number_of_proportions() -> None:
    config = load_steering({"paradigm": "mix", "algorithm": "static", "params": {"proportions": [0.5, 0.5]}})
    mixer = StaticMixer(config.stages["mix"].params)
    with pytest.raises(
        ConfigError, match=r"^datasteer\.params\.proportions: expected 3 proportions \(one per domain\), got 2"
    ):
        mixer.check_domains(("a", "b", "c"))
    mixer.check_domains(("a", "b"))  # the right number passes


@pytest.mark.parametrize("k", [1, 3, 7])
def test_uniform_default_fits_any_number_of_domains(k: int) -> None:
    mixer = StaticMixer(StaticParams())
    names = tuple(f"d{i}" for i in range(k))
    mixer.check_domains(names)  # no proportions given: nothing to match, no error
    uniform = torch.full((k,), 1 / k, dtype=torch.float64)
    assert torch.equal(mixer.initial(mix_context(names=names)), uniform)
    assert torch.equal(mixer.update(mix_context(names=names, update=1)), uniform)


@pytest.mark.parametrize(
    ("proportions", "expected"),
    [
        ([0.5, 0.6], r"^datasteer\.params\.proportions: proportions must sum to 1"),
        ([1.2, -0.2], r"^datasteer\.params\.proportions: proportions must be finite and >= 0"),
        ([], r"^datasteer\.params\.proportions: proportions are empty"),
    ],
)
def test_invalid_proportions_fail_at_parse_time(proportions: list[float], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_steering({"paradigm": "mix", "algorithm": "static", "params": {"proportions": proportions}})
