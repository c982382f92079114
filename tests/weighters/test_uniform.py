"""Tests of the uniform weighter."""

from __future__ import annotations

import torch

from datasteer.rng import torch_generator
from datasteer.weighters.base import WeightContext
from datasteer.weighters.uniform import UniformWeighter, UniformWeightParams


def test_ones_of_the_shape_and_dtype_of_the_losses() -> None:
    losses = torch.tensor([0.5, 2.0, 0.0, 7.5], dtype=torch.float64)
    ctx = WeightContext(
        step=3,
        max_steps=10,
        losses=losses,
        indices=torch.tensor([4, 1, 9, 0]),
        domains=torch.tensor([0, 1, 1, 0]),
        generator=torch_generator(0, "weight", 3),
    )
    weights = UniformWeighter(UniformWeightParams()).weigh(ctx)
    assert weights.shape == (4,)
    assert weights.dtype == torch.float64
    assert torch.equal(weights, torch.ones(4, dtype=torch.float64))
    assert not weights.requires_grad
