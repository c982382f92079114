"""ADO: per-domain power laws fitted online to training losses steer sampling to where loss falls fastest."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError
from datasteer.mixers.base import DomainStats, MixContext, Mixer, ObservesSteps, check_proportions
from datasteer.ops.power_law import fit_power_laws, savgol_smooth
from datasteer.registry import MIXERS

logger = logging.getLogger(__name__)

#: The learning-speed exponent is floored here (the authors' code: "arbitrarily bound exponent to be >= 0.05").
MIN_EXPONENT = 0.05
#: A fit needs at least as many points as the law has parameters.
MIN_FIT_POINTS = 3


@dataclass
class ADOParams:
    """Parameters of :class:`ADOMixer` (defaults: the paper and the authors' code)."""

    prior: Literal["natural", "uniform"] | list[float] = doc(
        "mu: 'natural' (each domain's share of the pool, the authors' default), 'uniform', or K proportions.",
        default="natural",
    )
    gamma1: float = doc("Credit assignment h <- gamma1 * (step's domain shares) + (1 - gamma1) h (0.1).", default=0.1)
    gamma2: float = doc("Policy pi = gamma2 * rho + (1 - gamma2) * (time average of rho) (0.1).", default=0.1)
    credit_exponent: float = doc("s in lambda = h^s (0.5).", default=0.5)
    min_probability: float = doc("delta_min: each preference is raised to it, then renormalised (0.01).", default=0.01)
    fit_every: int = doc("Steps between fits of the scaling laws (the authors: 1000).", default=1000)
    ignore_steps: int = doc("Losses of the first steps left out of the fits (the authors' runs: 1000).", default=1000)
    fit_stride: int = doc("Every fit_stride-th step's (smoothed) loss is a fit point (the authors: 10).", default=10)
    smoothing_window: int | None = doc(
        "Savitzky-Golay window (cubic) over each domain's loss series before the fit (the authors: 101); null: none.",
        default=101,
    )
    counts: Literal["total", "domain"] = doc(
        "n of each law: 'total' samples trained (the authors' code: every domain advances by the batch) or "
        "'domain' samples of that domain.",
        default="total",
    )

    def __post_init__(self) -> None:
        if isinstance(self.prior, list):
            check_proportions(self.prior, "prior")
        for key in ("gamma1", "gamma2"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"{key}: must be in (0, 1], got {getattr(self, key)}")
        if not math.isfinite(self.credit_exponent) or self.credit_exponent < 0:
            raise ConfigError(f"credit_exponent: must be finite and >= 0, got {self.credit_exponent}")
        if not 0.0 <= self.min_probability < 1.0:
            raise ConfigError(f"min_probability: must be in [0, 1), got {self.min_probability}")
        for key in ("fit_every", "fit_stride"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.ignore_steps < 0:
            raise ConfigError(f"ignore_steps: must be >= 0, got {self.ignore_steps}")
        if self.smoothing_window is not None and self.smoothing_window < 1:
            raise ConfigError(f"smoothing_window: must be >= 1 or null, got {self.smoothing_window}")


def clip_min_probability(p: torch.Tensor, floor: float) -> torch.Tensor:
    """``max(p, floor)`` renormalised (the authors' ``clip_min_probability`` when ``K floor <= 1``)."""
    clipped = p.clamp_min(floor)
    return clipped / clipped.sum()


@MIXERS.register("ado")
class ADOMixer(Mixer, ObservesSteps):
    """Adaptive Data Optimization (Jiang et al., 2024; arXiv 2410.11820): per-domain scaling laws steer the mixture.

    After every step each domain's mean training loss is recorded (a domain absent from the
    step keeps its previous value, as the authors' code imputes), with ``n`` the samples
    trained so far (``counts: total``: all domains, the authors' ``use_same_step_size``;
    ``domain``: that domain's). Every ``fit_every`` steps each domain's law
    ``L_d(n) = eps_d + beta_d n^(-alpha_d)`` is fitted to its loss series (smoothed by a
    cubic Savitzky-Golay filter of ``smoothing_window`` steps, the first ``ignore_steps``
    left out, every ``fit_stride``-th step kept): minimise the Huber loss (delta 1e-3) of
    ``log L_hat - log L`` plus the authors' soft bounds (``alpha <= 0.8``, ``alpha >= 0``,
    ``log beta <= 6.5``, ``log eps >= 0.5``), by L-BFGS from their grid of 512 starts; the
    best fit wins (a non-finite one is not kept).

    The policy, from the first fit on (before it, the prior ``mu``):

    * learning speed ``-dL_d/dn = max(alpha_d, 0.05) (L_d(n) - eps_d) / n``;
    * credit ``h <- gamma1 share + (1 - gamma1) h`` after each step, ``share`` the step's
      realised domain shares (the authors' code; ``h_0 = mu``), ``lambda = h^s``;
    * preference ``rho ∝ mu · lambda · (-dL/dn)``, each entry raised to ``min_probability``
      and renormalised;
    * policy ``pi = gamma2 rho + (1 - gamma2) rho_bar``, ``rho_bar`` the time average of
      ``rho`` over the steps served so far (``mu`` before the first fit), updated after.

    The paper updates every step: use ``update_every: 1``; warm-up steps train on ``mu``.
    """

    Params = ADOParams

    def __init__(self, params: ADOParams) -> None:
        super().__init__(params)
        self.steps: list[int] = []  # observed steps
        self.losses: list[list[float]] = []  # mean loss of each domain per observed step (imputed)
        self.samples: list[list[float]] = []  # samples of each domain per observed step
        self.credit: torch.Tensor | None = None  # h, (K,)
        self.average: torch.Tensor | None = None  # time average of rho, (K,)
        self.law: torch.Tensor | None = None  # (K, 3): log beta, log eps, alpha
        self.fitted_at = -1  # step of the latest fit
        self.preference: torch.Tensor | None = None  # the latest rho, for the record
        self.mu: torch.Tensor | None = None  # the prior, known from the first context on
        self.seen = torch.zeros(0, dtype=torch.float64)  # n of each domain now, (K,) once observed

    def check_domains(self, domain_names: Sequence[str]) -> None:
        p: ADOParams = self.params
        k = len(domain_names)
        if isinstance(p.prior, list):
            check_proportions(p.prior, "datasteer.params.prior", k)
        if k * p.min_probability > 1.0:
            raise ConfigError(f"min_probability: K x min_probability must be <= 1, got {k} x {p.min_probability}")

    def prior(self, ctx: MixContext) -> torch.Tensor:
        """``mu``: the pool's domain shares, uniform, or the given proportions."""
        p: ADOParams = self.params
        if isinstance(p.prior, list):
            return torch.tensor(p.prior, dtype=torch.float64)
        if p.prior == "uniform":
            return super().initial(ctx)
        sizes = torch.tensor(ctx.domain_sizes, dtype=torch.float64)
        return sizes / sizes.sum()

    def initial(self, ctx: MixContext) -> torch.Tensor:
        self.mu = self.prior(ctx)
        return self.mu.clone()

    # -- observations ------------------------------------------------------------------------
    def observe(self, stats: DomainStats) -> None:
        k = len(stats.samples)
        samples = stats.samples.double()
        mean = stats.mean_sample_loss().double()
        previous = torch.tensor(self.losses[-1], dtype=torch.float64) if self.losses else None
        fallback = previous if previous is not None else (stats.loss_sum.sum() / samples.sum()).expand(k)
        self.steps.append(stats.step)
        self.losses.append(torch.where(samples > 0, mean, fallback).tolist())
        self.samples.append(samples.tolist())
        self.seen = self._counted(samples) + (self.seen if len(self.seen) else 0.0)
        if self.credit is None:  # h_0 = mu
            self.credit = self.mu.clone() if self.mu is not None else torch.full((k,), 1.0 / k, dtype=torch.float64)
        share = samples / samples.sum()
        self.credit = self.params.gamma1 * share + (1 - self.params.gamma1) * self.credit

    def _counted(self, samples: torch.Tensor) -> torch.Tensor:
        """How far each domain's ``n`` advances for these samples (rows: steps)."""
        if self.params.counts == "total":
            return samples.sum(dim=-1, keepdim=True).expand_as(samples)
        return samples

    def cumulative_counts(self) -> torch.Tensor:
        """``n`` of each domain after each observed step, ``(T, K)``."""
        return self._counted(torch.tensor(self.samples, dtype=torch.float64)).cumsum(dim=0)

    # -- the scaling laws ----------------------------------------------------------------------
    def fit(self) -> torch.Tensor | None:
        """Fit every domain's law to its series so far; ``None`` while a domain has fewer than 3 points."""
        p: ADOParams = self.params
        if not self.steps:
            return None
        losses = torch.tensor(self.losses, dtype=torch.float64).T  # (K, T)
        counts = self.cumulative_counts().T
        if p.smoothing_window is not None:
            losses = torch.stack([savgol_smooth(series, p.smoothing_window) for series in losses])
        after = torch.tensor(self.steps) > p.ignore_steps
        keep = torch.zeros_like(counts, dtype=torch.bool)
        for d in range(len(counts)):  # every fit_stride-th point of each domain's kept series
            kept = (after & (counts[d] > 0)).nonzero().flatten()[:: p.fit_stride]
            keep[d, kept] = True
        if int(keep.sum(dim=1).min()) < MIN_FIT_POINTS:
            return None
        return fit_power_laws(counts, losses, keep)

    def learning_speed(self, n: torch.Tensor) -> torch.Tensor:
        """``-dL/dn = max(alpha, 0.05) (L(n) - eps) / n`` at ``n`` samples (0 where n = 0)."""
        assert self.law is not None
        log_beta, _, alpha = self.law.unbind(dim=1)
        safe = n.clamp_min(1.0)
        reducible = torch.exp(log_beta - alpha * torch.log(safe))  # L(n) - eps = beta n^-alpha
        return torch.where(n > 0, alpha.clamp_min(MIN_EXPONENT) * reducible / safe, 0.0)

    # -- the policy ----------------------------------------------------------------------------
    def update(self, ctx: MixContext) -> torch.Tensor:
        p: ADOParams = self.params
        mu = self.mu = self.prior(ctx)
        if self.steps and (self.law is None or ctx.step - self.fitted_at >= p.fit_every):
            law = self.fit()
            if law is not None and bool(torch.isfinite(law).all()):
                self.law, self.fitted_at = law, ctx.step
                logger.info("ado: scaling laws at step %d: %s", ctx.step, law.tolist())
            elif law is not None:
                logger.warning("ado: the scaling-law fit at step %d is not finite; the previous one is kept", ctx.step)
        if self.law is None:
            return mu
        n = self.seen
        credit = self.credit if self.credit is not None else mu
        rho = mu * credit.pow(p.credit_exponent) * self.learning_speed(n)
        rho = rho / rho.sum() if bool(rho.sum() > 0) and bool(torch.isfinite(rho).all()) else mu.clone()
        rho = clip_min_probability(rho, p.min_probability)
        average = self.average if self.average is not None else mu
        policy = p.gamma2 * rho + (1 - p.gamma2) * average
        served, span = ctx.first_step - 1, ctx.last_step - ctx.first_step + 1
        self.average = (served * average + span * rho) / (served + span)
        self.preference = rho
        return policy

    def report(self) -> dict[str, torch.Tensor | float]:
        out: dict[str, torch.Tensor | float] = {}
        if self.credit is not None:
            out["credit"] = self.credit
        if self.law is not None:
            out["irreducible_loss"] = torch.exp(self.law[:, 1])
            out["scale"] = torch.exp(self.law[:, 0])
            out["exponent"] = self.law[:, 2]
            out["learning_speed"] = self.learning_speed(self.seen)
        if self.preference is not None:
            out["preference"] = self.preference
        return out

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": torch.tensor(self.steps, dtype=torch.int64),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "samples": torch.tensor(self.samples, dtype=torch.float64),
            "credit": self.credit,
            "average": self.average,
            "law": self.law,
            "fitted_at": self.fitted_at,
            "preference": self.preference,
            "mu": self.mu,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state["steps"].tolist()]
        self.losses = state["losses"].tolist()
        self.samples = state["samples"].tolist()
        self.seen = self.cumulative_counts()[-1] if self.samples else torch.zeros(0, dtype=torch.float64)
        self.credit, self.average, self.law = state["credit"], state["average"], state["law"]
        self.fitted_at = int(state["fitted_at"])
        self.preference, self.mu = state["preference"], state["mu"]
