"""DoReMi step 2: Group DRO over domains against a reference model, learning domain weights."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from datasteer.capabilities import ComparesToReference
from datasteer.config import doc
from datasteer.errors import ConfigError
from datasteer.mixers.base import (
    DomainStats,
    MixContext,
    Mixer,
    ObservesSteps,
    ShapesDomainLoss,
    check_proportions,
)
from datasteer.registry import MIXERS

logger = logging.getLogger(__name__)


@dataclass
class DoReMiParams:
    """Parameters of :class:`DoReMiMixer`."""

    reference_model: str = doc(
        "Directory of the reference model trained in step 1 (a static run's output_dir); required."
    )
    eta: float = doc("Step size of the exponentiated-gradient update of the domain weights (paper: 1).", default=1.0)
    smoothing: float = doc(
        "Mix of the uniform distribution into the weights after each update (paper: 1e-3).", default=1e-3
    )
    proportions: list[float] | None = doc(
        "Sampling proportions of the proxy run (the reference run's; null: uniform).", default=None
    )

    def __post_init__(self) -> None:
        if not str(self.reference_model).strip():
            raise ConfigError("reference_model: give the directory of the step-1 reference model")
        if not self.eta > 0:
            raise ConfigError(f"eta: must be > 0, got {self.eta}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ConfigError(f"smoothing: must be in [0, 1], got {self.smoothing}")
        if self.proportions is not None:
            check_proportions(self.proportions, "proportions")


@MIXERS.register("doremi")
class DoReMiMixer(Mixer, ObservesSteps, ComparesToReference, ShapesDomainLoss):
    """DoReMi (Xie et al., 2023; arXiv 2305.10429): Group DRO domain weights from excess loss over a reference model.

    Step 2 of the DoReMi workflow (step 1 trains the reference model with a ``static`` run,
    step 3 trains the main model with a ``static`` run whose ``proportions_file`` is the
    ``domain_weights.json`` this run writes). The proxy trains on batches drawn with the
    reference proportions. After every optimizer step t, with ``l`` the proxy's and
    ``l_ref`` the reference model's per-token losses on that step's own training batch
    (all micro-batches and ranks):

    * ``lambda_d = sum over domain-d tokens of max(l - l_ref, 0) / (domain-d tokens)``
      (0 for a domain with no token in the step);
    * ``alpha' = alpha * exp(eta * lambda)``, ``alpha = (1 - c) alpha' / sum(alpha') + c / K``
      (``alpha_0`` uniform).

    The proxy's training objective is ``sum_d alpha_d * L_d``, ``L_d`` the mean loss of the
    step's domain-d samples, so its gradient is the alpha-weighted sum of per-domain
    gradients. Deviations, both forced by gradient accumulation: step t's loss is weighted
    by ``alpha_{t-1}`` (the paper updates alpha from the same batch before the proxy step,
    which needs every micro-batch's excess loss before the first backward), and ``L_d``
    averages per-sample token-mean losses (the paper's per-token mean; the two agree on
    packed pre-training rows, where every sample has the same number of tokens). The output
    is ``mean_t alpha_t``.

    A step whose excess losses or updated weights are not finite (the driver has already
    left out every sample with a non-finite loss) leaves ``alpha`` as it was and is not
    counted in the mean.
    """

    Params = DoReMiParams

    def __init__(self, params: DoReMiParams) -> None:
        super().__init__(params)
        self.alpha: torch.Tensor | None = None  # (K,) float64, in force for the next step
        self.alpha_sum: torch.Tensor | None = None  # sum of alpha_t over observed steps
        self.excess: torch.Tensor | None = None  # lambda of the last observed step
        self.steps_observed = 0

    def reference_model(self) -> str:
        return str(self.params.reference_model)

    def check_domains(self, domain_names: Sequence[str]) -> None:
        if self.params.proportions is not None:
            check_proportions(self.params.proportions, "datasteer.params.proportions", len(domain_names))

    def initial(self, ctx: MixContext) -> torch.Tensor:
        self._ensure(len(ctx.domain_names))  # alpha_0: uniform, weighting step 1's loss
        if self.params.proportions is None:
            return super().initial(ctx)
        return torch.tensor(self.params.proportions, dtype=torch.float64)

    def update(self, ctx: MixContext) -> torch.Tensor:
        """Sampling stays at the reference proportions; the weights act on the loss."""
        return self.initial(ctx)

    def _ensure(self, k: int) -> torch.Tensor:
        if self.alpha is None:
            self.alpha = torch.full((k,), 1.0 / k, dtype=torch.float64)
            self.alpha_sum = torch.zeros(k, dtype=torch.float64)
        return self.alpha

    def observe(self, stats: DomainStats) -> None:
        if stats.excess_sum is None:
            raise ConfigError("doremi: the step's excess losses are missing; the run has no reference model")
        p: DoReMiParams = self.params
        k = len(stats.tokens)
        alpha = self._ensure(k)
        tokens = stats.tokens.double()
        excess = torch.where(tokens > 0, stats.excess_sum.double() / tokens.clamp_min(1), 0.0)
        # Normalise in log space: exp(eta * lambda) cannot overflow this way.
        logits = alpha.log() + p.eta * excess
        updated = (1 - p.smoothing) * torch.softmax(logits, dim=0) + p.smoothing / k
        if not bool(torch.isfinite(excess).all() and torch.isfinite(updated).all()):
            logger.warning(
                "doremi: step %d's excess losses %s give no finite domain weights; alpha is left as it was",
                stats.step,
                excess.tolist(),
            )
            return
        self.alpha = updated
        assert self.alpha_sum is not None
        self.alpha_sum = self.alpha_sum + self.alpha
        self.excess = excess
        self.steps_observed += 1

    def loss_weights(self) -> torch.Tensor:
        if self.alpha is None:
            raise ConfigError("doremi: loss weights asked for before the run began")
        return self.alpha.clone()

    def learned_proportions(self) -> torch.Tensor | None:
        if self.alpha_sum is None or self.steps_observed == 0:
            return None
        return self.alpha_sum / self.steps_observed

    def report(self) -> dict[str, torch.Tensor | float]:
        if self.alpha is None:
            return {}
        out: dict[str, torch.Tensor | float] = {"alpha": self.alpha}
        mean = self.learned_proportions()
        if mean is not None:
            out["alpha_mean"] = mean
        if self.excess is not None:
            out["excess_loss"] = self.excess
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "alpha_sum": self.alpha_sum,
            "excess": self.excess,
            "steps_observed": self.steps_observed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha, self.alpha_sum, self.excess = state["alpha"], state["alpha_sum"], state["excess"]
        self.steps_observed = int(state["steps_observed"])
