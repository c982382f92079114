"""Online Data Mixing: domain proportions from an EXP3 bandit over training losses."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError, NonFiniteInputError, SteeringStateError
from datasteer.mixers.base import DomainStats, MixContext, Mixer, ObservesSteps
from datasteer.registry import MIXERS

logger = logging.getLogger(__name__)

Estimator = Literal["full", "importance"]


@dataclass
class ODMParams:
    """Parameters of :class:`ODMMixer`."""

    estimator: Estimator = doc(
        "How a step's losses become reward estimates. 'full' (for mixed batches, where every domain is "
        "seen every step): R_d <- alpha R_d + (1 - alpha) exp(r_d) for each trained domain, proportions "
        "follow R. 'importance' (the paper's Algorithm 1, meant for one domain per step): "
        "R_d <- alpha R_d + (1 - alpha) share_d r_d / pi_d, proportions follow softmax(eps_{t-1} R).",
        default="full",
    )
    alpha: float = doc("Smoothing of the reward estimates (0 keeps only the last step).", default=0.9)
    reward_scale: float = doc("Factor applied to each domain's mean training loss to make its reward.", default=1.0)
    reward_clip: tuple[float, float] | None = doc(
        "Clip each scaled reward to [low, high] before it is used; null: no clipping.", default=None
    )
    min_exploration: float = doc(
        "Floor on the exploration rate eps_t (the paper's schedule decays it as sqrt(ln K / (K t)), "
        "t the step); 0 follows the paper.",
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
    hard is worth sampling): after every optimizer step, each domain trained in it gets
    ``r_d = reward_scale * mean per-sample loss`` (optionally clipped). Statistics are summed
    over all micro-batches and ranks of the step first. At step ``t`` (1-based: the step the
    proportions are for, counted in steps whatever ``update_every`` is) the exploration rate
    is ``eps_t = min(1/K, sqrt(ln K / (K t)))``, floored by ``min_exploration``.

    Two estimators, for the two ways batches can be drawn:

    - ``full`` (default): batches mix domains, so every domain with mass is observed every
      step and its loss needs no importance weight. This is the rule of the authors' code
      for mixed batches: ``R_d <- alpha R_d + (1 - alpha) exp(r_d)`` for each trained domain
      (an untrained domain keeps its estimate) and ``pi = (1 - K eps_t) R / sum(R) + eps_t``,
      i.e. a softmax of the smoothed loss at temperature ``1 / reward_scale``. It is kept in
      log space, and bias-corrected as Adam's moments are (``R_d / (1 - alpha^n_d)`` after
      ``n_d`` observations), so that a domain first seen late is not under-rated.
    - ``importance``: the paper's Algorithm 1, an EXP3 estimate for one domain per step:
      ``R_d <- alpha R_d + (1 - alpha) share_d r_d / pi_d`` with ``share_d`` the domain's
      fraction of the step's samples (1 when a step is one domain; with mixed batches it
      keeps the estimate unbiased) and ``pi = (1 - K eps_t) softmax(eps_{t-1} R) + eps_t``.
      With mixed batches the smoothed ``R`` stays bounded while ``eps_{t-1}`` shrinks, so
      the proportions drift back to uniform: use ``full`` for mixed batches.

    A domain whose reward (or importance estimate) is not finite in a step is treated as
    not trained in it: its estimate is left as it was (the driver has already left out
    every sample with a non-finite loss).
    """

    Params = ODMParams

    def __init__(self, params: ODMParams) -> None:
        super().__init__(params)
        self.estimates: torch.Tensor | None = None  # R ('importance') or log R ('full'), (K,) float64
        self.counts: torch.Tensor | None = None  # steps each domain was trained in, (K,) int64
        self.steps_observed = 0

    def exploration(self, t: int, k: int) -> float:
        """eps_t of the paper's schedule (eps_0 = 1/K), floored by ``min_exploration``."""
        eps = 1.0 / k if t <= 0 else min(1.0 / k, math.sqrt(math.log(k) / (k * t)))
        return min(1.0 / k, max(eps, self.params.min_exploration))

    def observe(self, stats: DomainStats) -> None:
        p: ODMParams = self.params
        k = len(stats.samples)
        if self.estimates is None or self.counts is None:
            start = -math.inf if p.estimator == "full" else 0.0
            self.estimates = torch.full((k,), start, dtype=torch.float64)
            self.counts = torch.zeros(k, dtype=torch.int64)
        reward = p.reward_scale * stats.mean_sample_loss().double()  # NaN for a domain absent from the step
        if p.reward_clip is not None:
            reward = reward.clamp(p.reward_clip[0], p.reward_clip[1])
        present = (stats.samples > 0) & torch.isfinite(reward)
        while True:  # (a domain left out changes the others' shares: until no estimate overflows)
            trained = torch.where(present, stats.samples.double(), 0.0)
            share = trained / trained.sum().clamp_min(1)
            weighted = share * reward / stats.proportions.double().clamp_min(1e-12)
            finite = present & torch.isfinite(weighted) if p.estimator == "importance" else present
            if torch.equal(finite, present):
                break
            present = finite
        if not bool(present.any()):
            logger.warning(
                "odm: no domain of step %d has a finite reward; its estimates are left as they were", stats.step
            )
            return
        # Absent (or non-finite) domains are masked out below; 0 keeps NaN out of the arithmetic.
        reward = torch.where(present, reward, 0.0)
        if p.estimator == "full":
            # log(alpha R + (1 - alpha) exp(r)), for the domains trained in this step only
            if p.alpha > 0:
                mixed = torch.logaddexp(self.estimates + math.log(p.alpha), reward + math.log1p(-p.alpha))
            else:
                mixed = reward
            self.estimates = torch.where(present, mixed, self.estimates)
        else:
            weighted = torch.where(present, weighted, 0.0)
            self.estimates = p.alpha * self.estimates + (1 - p.alpha) * weighted
        self.counts = self.counts + present.long()
        self.steps_observed += 1

    def scores(self) -> torch.Tensor | None:
        """The logits the proportions follow before exploration; ``None`` before any observation.

        ``full``: the bias-corrected log estimates (a never-trained domain: -inf). ``importance``:
        the estimates themselves (scaled by ``eps_{t-1}`` in :meth:`update`).
        """
        if self.estimates is None or self.counts is None:
            return None
        if self.params.estimator == "importance":
            return self.estimates
        seen = self.counts > 0
        if not bool(seen.any()):
            return None
        correction = -torch.log1p(-torch.pow(self.params.alpha, self.counts.double().clamp_min(1)))
        return torch.where(seen, self.estimates + correction, -math.inf)

    def update(self, ctx: MixContext) -> torch.Tensor:
        k = len(ctx.domain_names)
        t = ctx.first_step
        eps = self.exploration(t, k)
        scores = self.scores()
        if scores is None:
            return torch.full((k,), 1.0 / k, dtype=torch.float64)
        if self.params.estimator == "importance":
            scores = self.exploration(t - 1, k) * scores
        proportions = (1 - k * eps) * torch.softmax(scores, dim=0) + eps
        if not bool(torch.isfinite(proportions).all()):
            raise NonFiniteInputError(f"the reward estimates {scores.tolist()} give no finite proportions")
        return proportions

    def report(self) -> dict[str, torch.Tensor | float]:
        scores = self.scores()
        return {} if scores is None else {"reward_estimates": scores}

    def _estimates_key(self) -> str:
        return "log_estimates" if self.params.estimator == "full" else "estimates"

    def state_dict(self) -> dict[str, Any]:
        # the key names the estimator: a state is refused by a run with the other one
        return {self._estimates_key(): self.estimates, "counts": self.counts, "steps_observed": self.steps_observed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        key = self._estimates_key()
        if key not in state:
            written_by = "importance" if self.params.estimator == "full" else "full"
            raise SteeringStateError(
                f"odm: the checkpoint's reward estimates were made by estimator {written_by!r}, "
                f"this run uses {self.params.estimator!r}; resume with estimator: {written_by}"
            )
        self.estimates = state[key]
        counts = state.get("counts")  # absent from states written before the 'full' estimator existed
        if counts is None and self.estimates is not None:
            counts = torch.full(self.estimates.shape, int(state["steps_observed"]), dtype=torch.int64)
        self.counts = counts
        self.steps_observed = int(state["steps_observed"])
