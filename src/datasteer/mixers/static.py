"""Fixed domain proportions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError
from datasteer.mixers.base import MixContext, Mixer, check_proportions
from datasteer.registry import MIXERS


@dataclass
class StaticParams:
    """Parameters of :class:`StaticMixer`."""

    proportions: list[float] | None = doc(
        "One proportion per domain, in dataset order, summing to 1; null means uniform.", default=None
    )

    proportions_file: str | None = doc(
        "A domain_weights.json written by a mixer run (DoReMi step 2); its proportions are matched to "
        "the domains by name. Excludes proportions.",
        default=None,
    )

    def __post_init__(self) -> None:
        if self.proportions is not None:
            check_proportions(self.proportions, "proportions")
        if self.proportions is not None and self.proportions_file is not None:
            raise ConfigError("proportions_file: give either proportions or proportions_file, not both")


def read_domain_weights(path: str, domain_names: Sequence[str]) -> list[float]:
    """The proportions of a ``domain_weights.json``, in the order of ``domain_names``.

    Raises:
        ConfigError: the file is missing, malformed, or names other domains.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"proportions_file: {path} does not exist; run the mixer run that writes it first")
    try:
        data = json.loads(file.read_text())
        weights = dict(zip(data["domains"], data["proportions"], strict=True))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"proportions_file: {path} is not a domain_weights.json ({exc})") from exc
    if sorted(weights) != sorted(domain_names):
        raise ConfigError(
            f"proportions_file: {path} has weights for domains {sorted(weights)}, this run has {sorted(domain_names)}"
        )
    values = [float(weights[name]) for name in domain_names]
    check_proportions(values, f"proportions_file {path}", len(domain_names))
    return values


@MIXERS.register("static")
class StaticMixer(Mixer):
    """Fixed proportions for the whole run (uniform unless given).

    The baseline of every mixing paper, and DoReMi's steps 1 (the reference model, on the
    initial proportions) and 3 (the main model, on the learned ``proportions_file``).
    """

    Params = StaticParams
    adaptive = False

    def __init__(self, params: StaticParams) -> None:
        super().__init__(params)
        self.proportions = params.proportions

    def check_domains(self, domain_names: Sequence[str]) -> None:
        if self.params.proportions_file is not None:
            self.proportions = read_domain_weights(self.params.proportions_file, domain_names)
        if self.proportions is not None:
            check_proportions(self.proportions, "datasteer.params.proportions", len(domain_names))

    def initial(self, ctx: MixContext) -> torch.Tensor:
        if self.params.proportions_file is not None and self.proportions is None:
            self.check_domains(ctx.domain_names)
        if self.proportions is None:
            return super().initial(ctx)
        return torch.tensor(self.proportions, dtype=torch.float64)

    def update(self, ctx: MixContext) -> torch.Tensor:
        return self.initial(ctx)
