"""Aioli: estimate the linear mixing law online from perturbed rounds, then an exponentiated-gradient step."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.mixers.base import (
    EVAL_SUFFIX,
    DomainStats,
    MixContext,
    Mixer,
    ObservesSteps,
    check_proportions,
    domain_eval_sets,
)
from datasteer.registry import MIXERS

logger = logging.getLogger(__name__)

Source = Literal["auto", "eval", "train"]


@dataclass
class AioliParams:
    """Parameters of :class:`AioliMixer` (defaults: the authors' README command, 2 domains)."""

    eta: float = doc("Step size of p <- p * exp(eta * 1^T A) (the authors' scripts: 0.1 to 1).", default=0.2)
    round_steps: int = doc(
        "Steps per round, S/T (the authors' update_steps: 250); A is learned once per round.", default=250
    )
    interval_steps: int = doc("Steps trained on each perturbed mixture (the authors' lp_steps: 4).", default=4)
    sweeps: int = doc(
        "Sweeps over the K perturbed mixtures per round (the authors' lp_rounds: 4); LearnParams takes "
        "delta = sweeps * K * interval_steps / round_steps of each round.",
        default=4,
    )
    one_hot_factor: float = doc(
        "Mass of the perturbed domain in its mixture, the rest shared equally (the authors: 0.625, 0.5, 0.75; "
        "1: one-hot); must exceed 1/K.",
        default=0.625,
    )
    normalize: bool = doc(
        "Shift A by its minimum when negative and divide by its sum (the authors' aioli_normalize_A).", default=True
    )
    ema: float | None = doc(
        "Weight of the past in A_bar <- (1 - ema) A + ema A_bar, with p = p0 * exp(eta * 1^T A_bar) normalised "
        "(the authors' --ema, 0.1 or 0.5 in their scripts); null: the paper's p <- p * exp(eta * 1^T A).",
        default=None,
    )
    source: Source = doc(
        "LearnParams' losses: 'eval' the held-out set named like each domain (<domain> or <domain>_eval) at the "
        "end of every interval, as the paper; 'train' the LearnParams steps' own training losses, fitted by least "
        "squares; 'auto' eval sets when every domain has one.",
        default="auto",
    )
    samples_per_domain: int | None = doc(
        "Held-out rows evaluated per domain (the first ones) with source eval; null: all.", default=64
    )
    proportions: list[float] | None = doc(
        "Initial proportions p0 (warm-up and the update's start); null: uniform.", default=None
    )

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise ConfigError(f"eta: must be > 0, got {self.eta}")
        for key in ("round_steps", "interval_steps", "sweeps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.one_hot_factor <= 1.0:
            raise ConfigError(f"one_hot_factor: must be in (0, 1], got {self.one_hot_factor}")
        if self.ema is not None and not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema: must be in [0, 1) or null, got {self.ema}")
        if self.source not in ("auto", "eval", "train"):
            raise ConfigError(f"source: must be 'auto', 'eval' or 'train', got {self.source!r}")
        if self.samples_per_domain is not None and self.samples_per_domain < 1:
            raise ConfigError(f"samples_per_domain: must be >= 1 or null, got {self.samples_per_domain}")
        if self.proportions is not None:
            check_proportions(self.proportions, "proportions")


def perturbed_mixtures(k: int, factor: float) -> torch.Tensor:
    """``W``: row j is the mixture of LearnParams interval j, ``factor`` on j and the rest equally."""
    rest = (1.0 - factor) / (k - 1)
    return torch.full((k, k), rest, dtype=torch.float64).fill_diagonal_(factor)


def exponentiated_step(log_p: torch.Tensor, a: torch.Tensor, eta: float) -> torch.Tensor:
    """``normalise(exp(log p) * exp(eta * 1^T A))``: column j of ``A`` sums what domain j lowers."""
    return torch.softmax(log_p + eta * a.sum(dim=0), dim=0)


def normalize_mixing_law(a: torch.Tensor) -> torch.Tensor:
    """``A - min(A)`` when the minimum is negative, divided by its sum (zero if that is 0)."""
    low = float(a.min())
    a = a - low if low < 0 else a
    total = float(a.sum())
    return a / total if total > 0 else torch.zeros_like(a)


@MIXERS.register("aioli")
class AioliMixer(Mixer, ObservesSteps):
    """Aioli (Chen et al., 2024; arXiv 2411.05735): online mixing-law estimates and exponentiated-gradient steps.

    The linear dynamic mixing law of the paper's LMO framework says that training one interval
    on mixture ``p`` lowers the loss of domain i by ``(A^t p)_i``; the proportions minimising
    the summed loss move by exponentiated gradient, ``p^t ∝ p^{t-1} ⊙ exp(eta 1^T A^t)``
    (Algorithm 1). Training is cut into rounds of ``round_steps`` steps from the first step
    after warm-up. Each round opens with LearnParams (Algorithm 2): ``sweeps`` sweeps, each a
    seeded permutation of the K domains, train ``interval_steps`` steps on the perturbed
    mixture of each domain j (``one_hot_factor`` on j, the rest equally, row j of ``W``);
    ``A^t`` is estimated, normalised (shifted by its minimum when negative, divided by its
    sum: the authors' ``aioli_normalize_A``), and ``p^t`` is trained for the rest of the
    round. With ``ema`` the update is the authors' variant ``p^t ∝ p^0 ⊙ exp(eta 1^T A_bar)``,
    ``A_bar <- (1 - ema) A^t + ema A_bar``. ``p^0`` is ``proportions`` (uniform by default, as
    the authors' code, which also restarts from uniform after a prior; here a prior is kept).

    Where the losses come from (``source``):

    - ``eval``, the paper's LearnParams: the held-out loss ``L`` of each domain (mean per-sample
      token loss of its first ``samples_per_domain`` eval rows) after every interval;
      ``beta_ij = L_i(before) - L_i(after)`` for the interval on mixture j, averaged over the
      sweeps, and ``A_i = W^{-1} beta_i`` (so that ``beta_ij = A_i · W_j``). It evaluates
      ``sweeps * K + 1`` times per round, at the interval boundaries, so it needs an update
      after every step.
    - ``train`` (deviation, for runs without per-domain eval sets): every LearnParams step's
      training losses, which the forward pass measures on fresh samples before the step's
      update. With ``x(s)`` the realised shares of the round's LearnParams steps before step
      ``s`` (in intervals), the same law reads ``l_i(s) = c_i - A_i · x(s)``; ``c_i, A_i`` are
      fitted by least squares over every domain-i sample of those steps. One training step
      holds few samples of a domain (1 of 8 for a non-perturbed domain of 4), so the paper's
      two-point differences on single steps would be mostly noise; the fit uses every step.

    Proportions are planned per step (``update_every`` must be 1). Updates are decided
    ``lag`` steps ahead, so the first ``lag`` steps after LearnParams still train
    ``p^{t-1}``: ``p^t`` needs the losses of the interval that ends just before them.
    """

    Params = AioliParams

    def __init__(self, params: AioliParams) -> None:
        super().__init__(params)
        self.start: int | None = None  # first step of round 0
        self.p0: torch.Tensor | None = None  # (K,) float64
        self.p: torch.Tensor | None = None  # p^t, in force after LearnParams
        self.a_bar: torch.Tensor | None = None  # EMA of the normalised A (ema set)
        self.last_a: torch.Tensor | None = None  # the normalised A of the latest round
        self.applied = -1  # latest round whose A moved p
        self.orders: dict[int, torch.Tensor] = {}  # round -> (sweeps, K) domain order
        self.source_used: str | None = None
        self.learn: dict[str, Any] = {}  # the current round's LearnParams data

    @property
    def needs_model(self) -> bool:  # type: ignore[override]
        """Held-out losses need the model; the training losses do not."""
        return bool(self.params.source != "train" and self.source_used != "train")

    # -- the plan ---------------------------------------------------------------------------
    def check_domains(self, domain_names: Sequence[str]) -> None:
        p: AioliParams = self.params
        k = len(domain_names)
        if k < 2 or p.one_hot_factor <= 1.0 / k:
            raise ConfigError(
                f"one_hot_factor: must exceed 1/K = 1/{k} (the perturbed mixtures must differ), got {p.one_hot_factor}"
            )
        if p.sweeps * k * p.interval_steps >= p.round_steps:
            raise ConfigError(
                f"round_steps: LearnParams takes sweeps x K x interval_steps = {p.sweeps * k * p.interval_steps} "
                f"steps; a round of {p.round_steps} leaves none for the learned mixture"
            )
        if p.proportions is not None:
            check_proportions(p.proportions, "datasteer.params.proportions", k)

    def initial(self, ctx: MixContext) -> torch.Tensor:
        if self.params.proportions is None:
            return super().initial(ctx)
        return torch.tensor(self.params.proportions, dtype=torch.float64)

    def _lp_steps(self, k: int) -> int:
        return int(self.params.sweeps * k * self.params.interval_steps)

    def _position(self, step: int) -> tuple[int, int]:
        """(round, step offset in it) of ``step``."""
        assert self.start is not None
        return divmod(step - self.start, self.params.round_steps)

    def planned(self, step: int, k: int) -> torch.Tensor:
        """The proportions of ``step``: a perturbed mixture during LearnParams, else ``p^t``."""
        assert self.p is not None
        r, offset = self._position(step)
        if offset >= self._lp_steps(k):
            return self.p.clone()
        sweep, slot = divmod(offset // self.params.interval_steps, k)
        domain = int(self.orders[r][sweep, slot])
        return perturbed_mixtures(k, self.params.one_hot_factor)[domain]

    def update(self, ctx: MixContext) -> torch.Tensor:
        k = len(ctx.domain_names)
        if ctx.first_step < ctx.last_step < ctx.max_steps:
            raise ConfigError(
                "update_every: aioli plans its proportions step by step (perturbed intervals, then rounds); set "
                f"update_every: 1 (this update shapes steps {ctx.first_step}-{ctx.last_step})"
            )
        if self.start is None:
            self.start = ctx.first_step
            self.p0 = self.initial(ctx)
            self.p = self.p0.clone()
        if self.source_used is None:
            self.source_used = self._resolve_source(ctx)
        if self.source_used == "eval":
            self._measure(ctx, k)
        else:
            self._learn_from_training(ctx.step, k)
        r, _ = self._position(ctx.first_step)
        if r not in self.orders:  # the sweeps' domain orders, drawn as the round's plan is first asked for
            self.orders[r] = torch.stack(
                [torch.randperm(k, generator=ctx.generator) for _ in range(self.params.sweeps)]
            )
            self.orders = {q: o for q, o in self.orders.items() if q >= r - 1}
        return self.planned(ctx.first_step, k)

    def _resolve_source(self, ctx: MixContext) -> str:
        p: AioliParams = self.params
        if p.source == "train":
            return "train"
        evals = domain_eval_sets(ctx.ops, ctx.domain_names)
        if evals is not None:
            return "eval"
        if p.source == "eval":
            have = [t.name for t in ctx.ops.targets]
            raise ConfigError(
                f"source: 'eval' needs an evaluation set named like each domain {list(ctx.domain_names)} "
                f"(or <domain>{EVAL_SUFFIX}); the run has {have}"
            )
        logger.info("aioli: no evaluation set per domain; LearnParams fits the training losses")
        return "train"

    # -- LearnParams from held-out losses (the paper) ------------------------------------------
    def _measure(self, ctx: MixContext, k: int) -> None:
        """Evaluate at an interval boundary (after step ``b_j = start - 1 + r R + j n``)."""
        assert self.start is not None
        if not self.learn:
            self.learn = {"round": 0, "losses": [], "next": self.start - 1}
        if ctx.step < self.learn["next"]:
            return
        if ctx.step > self.learn["next"]:
            raise SteeringStateError(
                f"aioli: the held-out losses after step {self.learn['next']} were never measured (an update runs "
                f"after every step only with update_every: 1); this update follows step {ctx.step}"
            )
        self.learn["losses"].append(self._held_out_losses(ctx))
        n, r = self.params.interval_steps, self.learn["round"]
        if len(self.learn["losses"]) <= self.params.sweeps * k:
            self.learn["next"] += n
            return
        self.move(self._paper_estimate(torch.stack(self.learn["losses"]), self.orders[r], k), r)
        next_round = self.start - 1 + (r + 1) * self.params.round_steps
        self.learn = {"round": r + 1, "losses": [], "next": next_round}

    def _held_out_losses(self, ctx: MixContext) -> torch.Tensor:
        evals = domain_eval_sets(ctx.ops, ctx.domain_names)
        if evals is None:
            raise SteeringStateError("aioli: the evaluation sets of the domains are gone")
        means = []
        for name, target in zip(ctx.domain_names, evals, strict=True):
            size = len(target.dataset)
            if size == 0:
                raise SteeringStateError(f"aioli: the evaluation set {target.name!r} of {name!r} is empty")
            rows = range(min(self.params.samples_per_domain or size, size))
            means.append(target.sample_losses(rows, desc=f"held-out loss {name}").double().mean())
        return torch.stack(means)

    def _paper_estimate(self, losses: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
        """``beta[:, j]`` = mean over sweeps of the loss drop of the interval on mixture j; ``A = beta W^{-1}``."""
        beta = torch.zeros(k, k, dtype=torch.float64)
        for interval, domain in enumerate(order.flatten().tolist()):
            beta[:, domain] += losses[interval] - losses[interval + 1]
        beta /= self.params.sweeps
        w = perturbed_mixtures(k, self.params.one_hot_factor)
        return torch.linalg.solve(w, beta.T).T  # row i solves W a = beta_i

    # -- LearnParams from training losses -------------------------------------------------------
    def observe(self, stats: DomainStats) -> None:
        if self.source_used != "train" or self.start is None or stats.step < self.start:
            return
        k = len(stats.samples)
        r, offset = self._position(stats.step)
        if offset >= self._lp_steps(k):
            return
        if self.learn.get("round") != r:
            self.learn = {
                "round": r,
                "gram": torch.zeros(k, k + 1, k + 1, dtype=torch.float64),
                "moment": torch.zeros(k, k + 1, dtype=torch.float64),
                "x": torch.zeros(k, dtype=torch.float64),
                "step": stats.step - offset - 1,
            }
        n = self.params.interval_steps
        for missed in range(self.learn["step"] + 1, stats.step):  # a step without a finite loss
            self.learn["x"] = self.learn["x"] + self.planned(missed, k) / n
        samples = stats.samples.double()
        z = torch.cat([torch.ones(1, dtype=torch.float64), -self.learn["x"]])
        self.learn["gram"] = self.learn["gram"] + samples[:, None, None] * torch.outer(z, z)
        self.learn["moment"] = (
            self.learn["moment"] + torch.where(samples > 0, stats.loss_sum.double(), 0.0)[:, None] * z
        )
        self.learn["x"] = self.learn["x"] + samples / samples.sum() / n
        self.learn["step"] = stats.step

    def _learn_from_training(self, step: int, k: int) -> None:
        """Once round r's LearnParams steps are all trained (and observed), fit A and step."""
        assert self.start is not None
        if step < self.start:
            return
        r = (step - self.start + 1 - self._lp_steps(k)) // self.params.round_steps  # latest round with LP done
        if r <= self.applied:
            return
        if self.learn.get("round") == r:
            theta = torch.linalg.pinv(self.learn["gram"], rtol=1e-10) @ self.learn["moment"].unsqueeze(-1)
            a = theta[:, 1:, 0]  # row i: (c_i, A_i)
        else:  # no LearnParams step of the round had a finite loss
            a = torch.zeros(k, k, dtype=torch.float64)
        self.move(a, r)

    # -- the update ----------------------------------------------------------------------------
    def move(self, a: torch.Tensor, r: int) -> None:
        """The exponentiated-gradient step with round ``r``'s estimate ``A`` (normalised first if asked)."""
        p: AioliParams = self.params
        assert self.p is not None and self.p0 is not None
        if not bool(torch.isfinite(a).all()):
            logger.warning("aioli: round %d's mixing law %s is not finite; p is left as it was", r, a.tolist())
            self.applied = r
            return
        a = normalize_mixing_law(a) if p.normalize else a
        if p.ema is None:
            self.p = exponentiated_step(torch.log(self.p), a, p.eta)
        else:
            self.a_bar = a if self.a_bar is None else (1 - p.ema) * a + p.ema * self.a_bar
            self.p = exponentiated_step(torch.log(self.p0), self.a_bar, p.eta)
        self.last_a, self.applied = a, r
        logger.info("aioli round %d: 1^T A %s -> p %s", r, a.sum(dim=0).tolist(), self.p.tolist())

    def report(self) -> dict[str, torch.Tensor | float]:
        if self.p is None:
            return {}
        out: dict[str, torch.Tensor | float] = {"mixture": self.p, "round": float(self.applied)}
        if self.last_a is not None:
            out["gain"] = self.last_a.sum(dim=0)
            out["mixing_law"] = self.last_a.flatten()
        return out

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "start": self.start,
            "p0": self.p0,
            "p": self.p,
            "last_a": self.last_a,
            "applied": self.applied,
            "orders": dict(self.orders),
            "source_used": self.source_used,
            "learn": {k: list(v) if isinstance(v, list) else v for k, v in self.learn.items()},
        }
        if self.params.ema is not None:
            state["a_bar"] = self.a_bar
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start, self.p0, self.p, self.last_a = state["start"], state["p0"], state["p"], state["last_a"]
        self.applied = int(state["applied"])
        self.orders = dict(state["orders"])
        self.source_used = state["source_used"]
        self.learn = {k: list(v) if isinstance(v, list) else v for k, v in state["learn"].items()}
        if self.params.ema is not None:
            self.a_bar = state["a_bar"]
