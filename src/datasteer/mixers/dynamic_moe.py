"""Dynamic data mixing for Mixture-of-Experts: domains whose expert loads differ most gain weight."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.mixers.base import EVAL_SUFFIX, MixContext, Mixer, domain_eval_sets
from datasteer.ops.moe import freeze_routers, normalize_loads
from datasteer.registry import MIXERS

if TYPE_CHECKING:
    from torch import nn


logger = logging.getLogger(__name__)


@dataclass
class DynamicMoEParams:
    """Parameters of :class:`DynamicMoEMixer`."""

    eta: float = doc("Step size: w <- softmax(log w + eta * Delta) (the paper's code: 10).", default=10.0)
    smoothing: float = doc(
        "c in w <- (1 - c) * w + c / K after each update (the paper's code: 0.05); 0: none, 1: uniform.",
        default=0.05,
    )
    source: Literal["auto", "eval", "pool"] = doc(
        "Held-out samples per domain: 'eval' the evaluation set named like the domain (<domain> or "
        "<domain>_eval), 'pool' a seeded sample of training rows, 'auto' eval sets when every domain has one.",
        default="auto",
    )
    samples_per_domain: int | None = doc(
        "Samples of each domain whose expert loads are counted (eval sets: the first ones; pool: a seeded "
        "sample drawn once); null: all.",
        default=64,
    )
    layer: int | None = doc(
        "MoE layer whose loads represent a domain (index among MoE layers; -1: the last, as the paper's "
        "code); null: every layer, concatenated and divided by the number of layers.",
        default=-1,
    )
    top_k: int | None = doc("Experts counted per token; null: the model config's num_experts_per_tok.", default=None)
    freeze_router: bool = doc(
        "Freeze the router parameters (matched by module type, or router_names) before training.", default=True
    )
    router_names: list[str] | None = doc(
        "Qualified module names (or whole-name glob patterns) of the routers, for models that do not "
        "declare them; null: found by type.",
        default=None,
    )

    def __post_init__(self) -> None:
        if not math.isfinite(self.eta) or self.eta < 0:
            raise ConfigError(f"eta: must be finite and >= 0, got {self.eta}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ConfigError(f"smoothing: must be in [0, 1], got {self.smoothing}")
        if self.source not in ("auto", "eval", "pool"):
            raise ConfigError(f"source: must be 'auto', 'eval' or 'pool', got {self.source!r}")
        if self.samples_per_domain is not None and self.samples_per_domain < 1:
            raise ConfigError(f"samples_per_domain: must be >= 1 or null, got {self.samples_per_domain}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k: must be >= 1 or null, got {self.top_k}")
        if self.router_names is not None and not self.router_names:
            raise ConfigError("router_names: give at least one name, or null to find the routers by type")


def update_weights(weights: torch.Tensor, delta: torch.Tensor, eta: float, smoothing: float) -> torch.Tensor:
    """One update: ``softmax(log w + eta * Delta)``, then ``(1 - c) w + c / K`` (float64)."""
    w = torch.softmax(torch.log(weights.double()) + eta * delta.double(), dim=0)
    return (1 - smoothing) * w + smoothing / len(w)


def load_distances(loads: torch.Tensor) -> torch.Tensor:
    """``Delta_d = (1/K) sum_j ||O_d - O_j||_2`` over all K domains (j = d adds 0), float64."""
    o = loads.double().flatten(1)
    return (o[:, None, :] - o[None, :, :]).norm(dim=-1).mean(dim=1)


@MIXERS.register("dynamic_moe")
class DynamicMoEMixer(Mixer):
    """Dynamic data mixing for MoE instruction tuning (Zhu et al., 2024; arXiv 2406.11256).

    At each update the model routes held-out samples of every domain. Domain d's
    representation ``O_d`` is its expert load: per MoE layer, the number of tokens
    (non-padding, prompt and response alike) routed to each expert by the router's top-k
    choice, summed over the domain's samples and L1-normalised. As in the paper's released
    code, the last MoE layer represents the domain (``layer: -1``); ``layer: null`` uses
    every layer (each normalised, concatenated and divided by their number, so ``O_d``
    still sums to 1). A domain whose routing differs from the others' holds less redundant
    data: ``Delta_d = (1/K) sum_j ||O_d - O_j||_2``, the mean over all K domains with
    ``j = d`` contributing 0 (the paper's "mean" criterion with L2 distance). The weights
    move as ``w <- softmax(log w + eta * Delta)`` and are smoothed,
    ``w <- (1 - c) w + c / K``; the proportions are ``w``, uniform at the start.

    Held-out samples come from the evaluation set named like each domain (``<domain>`` or
    ``<domain>_eval``) when every domain has one, else from a seeded sample of each
    domain's training rows, drawn once and kept, so that every update measures the same
    samples (the paper uses held-out dev sets; the reference crashes without them, and
    training rows are the fallback here: they may also be trained on). Loads are counted on
    every rank's share and gathered, so every rank computes the same weights. With
    ``freeze_router`` the routers (found by module type, not by a ``"gate"`` substring
    that would also freeze every ``gate_proj``) are frozen before training, as in the
    paper's runs.
    """

    Params = DynamicMoEParams
    needs_model = True

    def check_streams(self) -> None:
        if self.params.source != "eval":
            raise ConfigError(
                f"datasteer.params.source: dynamic_moe with source {self.params.source!r} may measure training "
                "rows of each domain, which streamed domains do not hold; set source: eval (an evaluation set "
                "per domain, named <domain> or <domain>_eval) or streaming: false"
            )

    def __init__(self, params: DynamicMoEParams) -> None:
        super().__init__(params)
        self.weights: torch.Tensor | None = None  # w, (K,) float64
        self.held_out: torch.Tensor | None = None  # pool rows measured when source is 'pool'
        self.source_used: str | None = None
        self.last_loads: torch.Tensor | None = None  # O, (K, L', E)
        self.last_delta: torch.Tensor | None = None  # Delta, (K,)
        self.history: list[dict[str, Any]] = []

    def prepare_model(self, model: nn.Module) -> None:
        p: DynamicMoEParams = self.params
        if p.freeze_router:
            freeze_routers(model, p.router_names)

    # -- held-out samples ------------------------------------------------------------------
    def _pool_rows(self, ctx: MixContext) -> torch.Tensor:
        """A seeded sample of ``samples_per_domain`` training rows of each domain (drawn once)."""
        if self.held_out is None:
            n = self.params.samples_per_domain
            parts = []
            for d in range(len(ctx.domain_names)):
                rows = torch.nonzero(ctx.domains == d).flatten()
                order = torch.randperm(len(rows), generator=ctx.generator)
                parts.append(rows[order[:n]].sort().values if n is not None else rows)
            self.held_out = torch.cat(parts)
        return self.held_out

    def domain_loads(self, ctx: MixContext) -> torch.Tensor:
        """Normalised expert loads of each domain's held-out samples, ``(K, L, E)``."""
        p: DynamicMoEParams = self.params
        ops = ctx.ops
        if ops is None:
            raise SteeringStateError("dynamic_moe needs the model: no model operations were given")
        evals = domain_eval_sets(ops, ctx.domain_names) if p.source != "pool" else None
        if p.source == "eval" and evals is None:
            have = [t.name for t in ops.targets]
            raise ConfigError(
                f"source: 'eval' needs an evaluation set named like each domain {list(ctx.domain_names)} "
                f"(or <domain>{EVAL_SUFFIX}); the run has {have}"
            )
        if evals is not None:
            self.source_used = "eval"
            loads = []
            for name, target in zip(ctx.domain_names, evals, strict=True):
                size = len(target.dataset)
                if size == 0:
                    raise SteeringStateError(f"dynamic_moe: the evaluation set {target.name!r} of {name!r} is empty")
                rows = range(min(p.samples_per_domain or size, size))
                loads.append(normalize_loads(target.expert_loads(rows, top_k=p.top_k, desc=f"expert loads {name}")))
            return torch.stack(loads)
        if self.source_used is None and p.source == "auto":
            logger.info("dynamic_moe: no evaluation set per domain; measuring a seeded sample of training rows")
        self.source_used = "pool"
        pool_rows = self._pool_rows(ctx)
        counts = ops.expert_loads(pool_rows, top_k=p.top_k, desc="expert loads (pool)")
        ids = ctx.domains[pool_rows]
        return torch.stack([normalize_loads(counts[ids == d]) for d in range(len(ctx.domain_names))])

    # -- the update ------------------------------------------------------------------------
    def update(self, ctx: MixContext) -> torch.Tensor:
        p: DynamicMoEParams = self.params
        if self.weights is None:
            self.weights = ctx.proportions.double().clone()
        loads = self.domain_loads(ctx)
        if p.layer is None:
            rep = loads / loads.shape[1]
        else:
            if not -loads.shape[1] <= p.layer < loads.shape[1]:
                raise ConfigError(f"layer: the model has {loads.shape[1]} MoE layers, got {p.layer}")
            rep = loads[:, p.layer].unsqueeze(1)
        delta = load_distances(rep)
        self.weights = update_weights(self.weights, delta, p.eta, p.smoothing)
        self.last_loads, self.last_delta = rep, delta
        self.history.append(
            {"update": ctx.update, "step": ctx.step, "delta": delta.tolist(), "weights": self.weights.tolist()}
        )
        logger.info(
            "dynamic_moe update %d (%s loads): Delta %s -> w %s",
            ctx.update,
            self.source_used,
            delta.tolist(),
            self.weights.tolist(),
        )
        return self.weights.clone()

    def report(self) -> dict[str, torch.Tensor | float]:
        """Delta per domain and the load vectors behind the latest update."""
        if self.last_delta is None or self.last_loads is None:
            return {}
        return {"delta": self.last_delta, "expert_loads": self.last_loads.flatten(1)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "held_out": self.held_out,
            "source_used": self.source_used,
            "last_loads": self.last_loads,
            "last_delta": self.last_delta,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"]
        self.held_out = state["held_out"]
        self.source_used = state["source_used"]
        self.last_loads = state["last_loads"]
        self.last_delta = state["last_delta"]
        self.history = [dict(h) for h in state["history"]]
