"""Tests of the uniform weighter."""

from __future__ import annotations

import torch

from datasteer.weighters.uniform import UniformWeighter, UniformWeightParams
from tests.factories import weight_context


def test_ones_of_the_shape_and_dtype_of_the_losses() -> None:
    losses = torch.tensor([0.5, 2.0, 0.0, 7.5], dtype=torch.float64)
    ctx = weight_context(losses, indices=torch.tensor([4, 1, 9, 0]), domains=torch.tensor([0, 1, 1, 0]), step=3)
    weights = UniformWeighter(UniformWeightParams()).weigh(ctx)
    assert weights.shape == (4,)
    assert weights.dtype == torch.float64
    assert torch.equal(weights, torch.ones(4, dtype=torch.float64))
    assert not weights.requires_grad
