"""Online Data Mixing: domain proportions from an EXP3 bandit over training losses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError
from datasteer.mixers.base import DomainStats, MixContext, Mixer, ObservesSteps
from datasteer.registry import MIXERS


@dataclass
class ODMParams:
    """Parameters of :class:`ODMMixer`."""

    alpha: float = doc(
        "Smoothing of the reward estimates: R <- alpha * R + (1 - alpha) * r / pi (0 keeps only the last step).",
        default=0.9,
    )
    reward_scale: float = doc("Factor applied to each domain's mean training loss to make its reward.", default=1.0)
    reward_clip: tuple[float, float] | None = doc(
        "Clip each scaled reward to [low, high] before importance weighting; null: no clipping.", default=None
    )
    min_exploration: float = doc(
        "Floor on the exploration rate eps_t (the paper's schedule decays it as sqrt(ln K / (K t))); "
        "0 follows the paper.",
        default=0.0,
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"alpha: must be in [0, 1), got {self.alpha}")
        if not self.reward_scale > 0:
            raise ConfigError(f"reward_scale: must be > 0, got {self.reward_scale}")
        if self.reward_clip is not None and not self.reward_clip[0] <= self.reward_clip[1]:
            raise ConfigError(f"reward_clip: needs low <= high, got {list(self.reward_clip)}")
        if not self.min_exploration >= 0.0:
            raise ConfigError(f"min_exploration: must be >= 0, got {self.min_exploration}")


@MIXERS.register("odm")
class ODMMixer(Mixer, ObservesSteps):
    """Online Data Mixing (Albalak et al., 2023; arXiv 2312.02406): EXP3 over domains.

    Each domain is an arm whose reward is its training loss (a domain the model still finds
    hard is worth sampling). After every optimizer step, each domain present in the batch
    gets reward ``r_d = reward_scale * mean per-sample loss`` (optionally clipped), and the
    estimate moves as ``R_d <- alpha R_d + (1 - alpha) r_d / pi_d`` with ``pi_d`` the
    proportion the step was drawn with; a domain absent from the step gets the EXP3
    estimate 0 (``R_d <- alpha R_d``), which keeps ``r / pi`` unbiased. At update ``t``
    (1-based) the exploration rate is ``eps_t = min(1/K, sqrt(ln K / (K t)))`` (floored by
    ``min_exploration``) and the proportions are
    ``pi = (1 - K eps_t) softmax(eps_{t-1} R) + eps_t``. Statistics are summed over all
    micro-batches and ranks of the step before they are used.
    """

    Params = ODMParams

    def __init__(self, params: ODMParams) -> None:
        super().__init__(params)
        self.estimates: torch.Tensor | None = None  # R, (K,) float64
        self.steps_observed = 0

    def exploration(self, t: int, k: int) -> float:
        """eps_t of the paper's schedule (eps_0 = 1/K), floored by ``min_exploration``."""
        eps = 1.0 / k if t <= 0 else min(1.0 / k, math.sqrt(math.log(k) / (k * t)))
        return min(1.0 / k, max(eps, self.params.min_exploration))

    def observe(self, stats: DomainStats) -> None:
        p: ODMParams = self.params
        k = len(stats.samples)
        if self.estimates is None:
            self.estimates = torch.zeros(k, dtype=torch.float64)
        present = stats.samples > 0
        reward = p.reward_scale * torch.nan_to_num(stats.mean_sample_loss().double(), nan=0.0)
        if p.reward_clip is not None:
            reward = reward.clamp(p.reward_clip[0], p.reward_clip[1])
        weighted = torch.where(present, reward / stats.proportions.double().clamp_min(1e-12), 0.0)
        self.estimates = p.alpha * self.estimates + (1 - p.alpha) * weighted
        self.steps_observed += 1

    def update(self, ctx: MixContext) -> torch.Tensor:
        k = len(ctx.domain_names)
        t = ctx.update + 1
        estimates = self.estimates if self.estimates is not None else torch.zeros(k, dtype=torch.float64)
        eps, eps_prev = self.exploration(t, k), self.exploration(t - 1, k)
        return (1 - k * eps) * torch.softmax(eps_prev * estimates, dim=0) + eps

    def report(self) -> dict[str, torch.Tensor | float]:
        return {} if self.estimates is None else {"reward_estimates": self.estimates}

    def state_dict(self) -> dict[str, Any]:
        return {"estimates": self.estimates, "steps_observed": self.steps_observed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimates = state["estimates"]
        self.steps_observed = int(state["steps_observed"])
