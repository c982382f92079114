"""Tests of the random (Dirichlet) mixer."""

from __future__ import annotations

import pytest
import torch

from datasteer.config import load_steering
from datasteer.errors import ConfigError
from datasteer.mixers.random import RandomMixer, RandomMixParams
from tests.factories import mix_context


@pytest.mark.parametrize("concentration", [0.1, 1.0, 10.0])
def test_proportions_are_valid(concentration: float) -> None:
    mixer = RandomMixer(RandomMixParams(concentration=concentration))
    for update in range(5):
        p = mixer.update(mix_context(k=4, seed=0, update=update))
        assert p.shape == (4,) and p.dtype == torch.float64
        assert (p >= 0).all()
        assert abs(float(p.sum()) - 1.0) < 1e-12


def test_deterministic_for_the_same_generator_seed() -> None:
    mixer = RandomMixer(RandomMixParams())
    assert torch.equal(mixer.update(mix_context(seed=7, update=2)), mixer.update(mix_context(seed=7, update=2)))
    assert torch.equal(
        mixer.update(mix_context(seed=7, update=2)),
        RandomMixer(RandomMixParams()).update(mix_context(seed=7, update=2)),
    )


def test_different_across_updates_and_seeds() -> None:
    mixer = RandomMixer(RandomMixParams())
    draws = [mixer.update(mix_context(seed=7, update=update)) for update in range(4)]
    draws.append(mixer.update(mix_context(seed=8, update=0)))
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            assert not torch.allclose(draws[i], draws[j]), (i, j)


def test_large_concentration_stays_near_uniform() -> None:
    mixer = RandomMixer(RandomMixParams(concentration=1e6))
    p = mixer.update(mix_context(k=4, seed=0, update=0))
    # Dirichlet(alpha) with K = 4 has std sqrt(p (1 - p) / (K alpha + 1)) ~ 2e-4 per coordinate.
    assert torch.allclose(p, torch.full((4,), 0.25, dtype=torch.float64), atol=5e-3)


def test_small_concentration_is_far_from_uniform() -> None:
    # The counterpart of the test above: concentration actually changes the draw.
    mixer = RandomMixer(RandomMixParams(concentration=0.05))
    p = mixer.update(mix_context(k=4, seed=0, update=0))
    assert float((p - 0.25).abs().max()) > 0.1


@pytest.mark.parametrize("concentration", [0, -1.0])
def test_concentration_must_be_positive(concentration: float) -> None:
    with pytest.raises(ConfigError, match=r"^datasteer\.params\.concentration: must be > 0"):
        load_steering({"paradigm": "mix", "algorithm": "random", "params": {"concentration": concentration}})
