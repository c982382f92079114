"""ReducibleLossWeighter (RHO-LOSS's signal as weights): hand-computed weights."""

from __future__ import annotations

import math

import pytest
import torch

from datasteer.errors import ConfigError, SteeringStateError
from datasteer.plan import build_plan
from datasteer.weighters.reducible import ReducibleLossWeighter, ReducibleParams
from tests.factories import weight_context


def test_soft_weights_by_hand() -> None:
    weighter = ReducibleLossWeighter(ReducibleParams(reference_model="ref", temperature=0.5))
    # reducible = [3 - 2.5, 4 - 1, 6 - 6] = [0.5, 3, 0]; / 0.5 = [1, 6, 0]
    w = weighter.weigh(weight_context(torch.tensor([3.0, 4.0, 6.0]), reference_losses=torch.tensor([2.5, 1.0, 6.0])))
    exp = [math.exp(1.0), math.exp(6.0), math.exp(0.0)]
    torch.testing.assert_close(w, torch.tensor([3 * e / sum(exp) for e in exp], dtype=torch.float64))
    # the noisiest sample (highest training loss, all of it irreducible) weighs least
    assert int(w.argmin()) == 2


def test_hard_fraction_keeps_the_top_reducible_losses() -> None:
    weighter = ReducibleLossWeighter(ReducibleParams(reference_model="ref", fraction=0.5))
    w = weighter.weigh(
        weight_context(torch.tensor([3.0, 4.0, 6.0, 1.0]), reference_losses=torch.tensor([2.5, 1.0, 6.0, 0.0]))
    )  # reducible [0.5, 3, 0, 1]
    torch.testing.assert_close(w, torch.tensor([0.0, 2.0, 0.0, 2.0], dtype=torch.float64))
    odd = weighter.weigh(
        weight_context(torch.tensor([1.0, 2.0, 3.0]), reference_losses=torch.tensor([0.0, 0.0, 0.0]))
    )  # keep ceil(1.5) = 2
    torch.testing.assert_close(odd, torch.tensor([0.0, 1.5, 1.5], dtype=torch.float64))


def test_needs_the_reference_losses() -> None:
    with pytest.raises(SteeringStateError, match="reference model's losses are missing"):
        ReducibleLossWeighter(ReducibleParams(reference_model="ref")).weigh(weight_context(torch.tensor([1.0])))


def test_params_and_plan() -> None:
    with pytest.raises(ConfigError, match="fraction"):
        ReducibleParams(reference_model="ref", fraction=1.5)
    plan = build_plan({"paradigm": "weight", "algorithm": "reducible", "params": {"reference_model": "ref"}})
    assert plan.reference_model() == "ref"
    with pytest.raises(ConfigError, match="doremi trains on its own domain-weighted loss"):
        build_plan(
            {
                "mix": {"algorithm": "doremi", "params": {"reference_model": "a"}},
                "weight": {"algorithm": "reducible", "params": {"reference_model": "a"}},
            }
        )


def test_a_tiny_temperature_keeps_the_weights_finite() -> None:
    weighter = ReducibleLossWeighter(ReducibleParams(reference_model="ref", temperature=1e-320))
    w = weighter.weigh(weight_context(torch.tensor([3.0, 4.0, 6.0]), reference_losses=torch.tensor([2.5, 1.0, 6.0])))
    assert w.tolist() == [0.0, 3.0, 0.0]  # the limit: all weight on the largest reducible loss
