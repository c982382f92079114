"""Uniform weights: the unweighted baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from datasteer.registry import WEIGHTERS
from datasteer.weighters.base import WeightContext, Weighter


@dataclass
class UniformWeightParams:
    """:class:`UniformWeighter` has no parameters."""


@WEIGHTERS.register("uniform")
class UniformWeighter(Weighter):
    """Weight 1 for every sample: the mean of per-sample token-mean losses.

    The baseline of every reweighting method; it differs from the Trainer's default loss
    only in averaging per sample rather than per token.
    """

    Params = UniformWeightParams

    def weigh(self, ctx: WeightContext) -> torch.Tensor:
        return torch.ones_like(ctx.losses)
