"""Piecewise-linear domain proportions over training steps."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError
from datasteer.mixers.base import MixContext, Mixer, check_proportions
from datasteer.registry import MIXERS


@dataclass
class ScheduledParams:
    """Parameters of :class:`ScheduledMixer`."""

    schedule: list[tuple[int, list[float]]] = doc(
        "Points [step, [p_1, ..., p_K]] with increasing steps; proportions are interpolated "
        "linearly between points and held constant before the first and after the last."
    )

    def __post_init__(self) -> None:
        if not self.schedule:
            raise ConfigError("schedule: give at least one [step, proportions] point")
        steps = [s for s, _ in self.schedule]
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ConfigError(f"schedule: steps must increase strictly, got {steps}")
        if steps[0] < 0:
            raise ConfigError(f"schedule: steps must be >= 0, got {steps[0]}")
        width = len(self.schedule[0][1])
        for i, (_, props) in enumerate(self.schedule):
            check_proportions(props, f"schedule[{i}]", width)


@MIXERS.register("scheduled")
class ScheduledMixer(Mixer):
    """Proportions that follow a piecewise-linear schedule in the training step.

    A curriculum over domains. Each update takes the schedule's value at the first step
    it shapes; with ``update_every: 1`` every step follows the schedule exactly.
    """

    Params = ScheduledParams

    def check_domains(self, domain_names: Sequence[str]) -> None:
        for i, (_, props) in enumerate(self.params.schedule):
            check_proportions(props, f"datasteer.params.schedule[{i}]", len(domain_names))

    def at(self, step: int) -> torch.Tensor:
        """The scheduled proportions at ``step``."""
        points = self.params.schedule
        if step <= points[0][0]:
            return torch.tensor(points[0][1], dtype=torch.float64)
        for (s0, p0), (s1, p1) in itertools.pairwise(points):
            if step <= s1:
                t = (step - s0) / (s1 - s0)
                a, b = torch.tensor(p0, dtype=torch.float64), torch.tensor(p1, dtype=torch.float64)
                return (1 - t) * a + t * b
        return torch.tensor(points[-1][1], dtype=torch.float64)

    def initial(self, ctx: MixContext) -> torch.Tensor:
        return self.at(ctx.first_step)

    def update(self, ctx: MixContext) -> torch.Tensor:
        return self.at(ctx.first_step)
