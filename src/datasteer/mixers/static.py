"""Fixed domain proportions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from datasteer.config import doc
from datasteer.mixers.base import MixContext, Mixer, check_proportions
from datasteer.registry import MIXERS


@dataclass
class StaticParams:
    """Parameters of :class:`StaticMixer`."""

    proportions: list[float] | None = doc(
        "One proportion per domain, in dataset order, summing to 1; null means uniform.", default=None
    )

    def __post_init__(self) -> None:
        if self.proportions is not None:
            check_proportions(self.proportions, "proportions")


@MIXERS.register("static")
class StaticMixer(Mixer):
    """Fixed proportions for the whole run (uniform unless given).

    The baseline of every mixing paper, and DoReMi's step 3 (train with the learned mixture).
    """

    Params = StaticParams
    adaptive = False

    def check_domains(self, domain_names: Sequence[str]) -> None:
        if self.params.proportions is not None:
            check_proportions(self.params.proportions, "datasteer.params.proportions", len(domain_names))

    def initial(self, ctx: MixContext) -> torch.Tensor:
        if self.params.proportions is None:
            return super().initial(ctx)
        return torch.tensor(self.params.proportions, dtype=torch.float64)

    def update(self, ctx: MixContext) -> torch.Tensor:
        return self.initial(ctx)
