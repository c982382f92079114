"""RHO-LOSS: from a larger candidate batch, train on the points the model can still learn."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from datasteer.capabilities import ComparesToReference
from datasteer.config import doc
from datasteer.errors import ConfigError, NonFiniteInputError, SteeringStateError
from datasteer.registry import SELECTORS
from datasteer.selectors.base import PoolPasses, SelectContext, Selector, candidate_count, warn_if_no_choice

logger = logging.getLogger(__name__)


@dataclass
class RhoLossParams:
    """Parameters of :class:`RhoLossSelector`."""

    reference_model: str = doc(
        "Directory of the irreducible-loss (IL) model: a model trained on holdout data of the training "
        "distribution (e.g. examples/select_rho_loss_1_irreducible.yaml); required."
    )
    fraction: float = doc(
        "Selected / candidates, n_b / n_B: each update scores ceil(selection / fraction) candidates and "
        "keeps the best `selection` (paper: 0.1).",
        default=0.1,
    )

    def __post_init__(self) -> None:
        if not str(self.reference_model).strip():
            raise ConfigError("reference_model: give the directory of the irreducible-loss model")
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"fraction: must be in (0, 1) (1 would keep every candidate), got {self.fraction}")


def top_reducible(reducible: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest finite reducible losses, largest first; ties go to the
    lower position. Non-finite values are never chosen (fewer than ``k`` come back if fewer
    are finite)."""
    finite = torch.nonzero(torch.isfinite(reducible)).flatten()
    order = torch.argsort(reducible[finite], descending=True, stable=True)
    return finite[order][:k]


@SELECTORS.register("rho_loss")
class RhoLossSelector(Selector, ComparesToReference):
    """RHO-LOSS (Mindermann et al., ICML 2022; arXiv 2206.07137): keep the candidates of highest reducible holdout loss.

    Each update draws a candidate batch ``B_t`` of ``n_B = ceil(n_b / fraction)`` pool
    samples, ``n_b`` being the selection (global batch x steps of the update; with
    ``update_every: 1`` one step, as in the paper), and keeps the ``n_b`` with the largest
    reducible holdout loss (paper, Eq. 3 and Algorithm 1)::

        rho(x, y) = L[y | x; D_t] - L[y | x; D_ho]

    ``L[y | x; D_t]`` is the live model's token-mean loss (a no-grad pass in eval mode, the
    loss of :meth:`~datasteer.ops.protocol.ModelOperations.sample_losses`; the authors' code
    scores in train mode by default, which differs only under dropout or batch norm);
    ``L[y | x; D_ho]``, the irreducible loss, is the same loss under the IL model
    (``reference_model``, trained on holdout data). A point hard for both (noise) or
    already learnt has a small ``rho``; learnable, not yet learnt points a large one.

    The irreducible losses are computed once per pool sample, the first time it is a
    candidate, and kept in the selector's state (so a resumed run never recomputes them),
    with the IL model's path: a checkpoint whose losses came from another path drops them.
    Candidate batches come from a shuffled pass over the pool, as the authors' data loader
    serves its large batches: every sample is a candidate once per pass; a batch that
    crosses the end of a pass takes the pass's last samples and starts the next pass
    (a fresh seeded permutation of the other samples). A pool not larger than ``n_B`` is
    scored whole at every update.

    Ties keep the sample of the lower pool index. A candidate whose loss or irreducible
    loss is not finite is never kept (counted as ``nonfinite``); with fewer finite
    candidates than ``n_b`` the finite ones are all kept (the sampler repeats them), and
    with none the selection in force stands.
    """

    Params = RhoLossParams
    needs_model = True

    def __init__(self, params: RhoLossParams) -> None:
        super().__init__(params)
        self.irreducible: torch.Tensor | None = None  # (pool,) float32; a value per known sample
        self.known: torch.Tensor | None = None  # (pool,) bool: whose irreducible loss is computed
        self.source: str | None = None  # the IL model those losses came from
        self.passes = PoolPasses()  # the candidate batches
        self._report: dict[str, int | float] = {}

    def reference_model(self) -> str:
        return str(self.params.reference_model)

    def report(self) -> dict[str, int | float]:
        """``nonfinite``: candidates of the latest update left out (loss or irreducible loss
        not finite); ``irreducible_computed``: irreducible losses computed in it (new candidates)."""
        return dict(self._report)

    def select(self, ctx: SelectContext) -> torch.Tensor:
        p: RhoLossParams = self.params
        assert ctx.ops is not None
        candidates = self.passes.next(ctx, candidate_count(ctx.num_samples, p.fraction))
        warn_if_no_choice("rho_loss", ctx, len(candidates), subset=False)
        losses = ctx.ops.sample_losses(candidates, desc=f"rho-loss selector, update {ctx.update}")
        irreducible, computed = self._irreducible(ctx, candidates)
        reducible = losses.double() - irreducible.double()
        finite = torch.isfinite(reducible)
        self._report = {"nonfinite": int((~finite).sum()), "irreducible_computed": computed}
        if not bool(finite.any()):
            raise NonFiniteInputError(f"none of the {len(candidates)} candidates has a finite reducible loss")
        kept = top_reducible(reducible, ctx.num_samples)
        if len(kept) < ctx.num_samples:
            logger.warning(
                "rho_loss: %d samples needed but only %d candidates have a finite reducible loss; "
                "they are all kept (and repeated)",
                ctx.num_samples,
                len(kept),
            )
        return candidates[kept]

    def _irreducible(self, ctx: SelectContext, candidates: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The candidates' irreducible losses (computing those not known yet) and how many were computed."""
        if self.known is not None and len(self.known) != ctx.pool_size:
            raise SteeringStateError(
                f"rho_loss: the state is for a pool of {len(self.known)} samples, this pool has {ctx.pool_size}"
            )
        if self.irreducible is None or self.known is None:
            self.irreducible = torch.full((ctx.pool_size,), math.nan, dtype=torch.float32)
            self.known = torch.zeros(ctx.pool_size, dtype=torch.bool)
            self.source = self.reference_model()
        missing = candidates[~self.known[candidates]]
        if len(missing):
            losses = ctx.ops.reference_losses(missing, desc=f"irreducible losses, update {ctx.update}")
            self.irreducible[missing] = losses.float()
            self.known[missing] = True
        return self.irreducible[candidates], len(missing)

    def window_ratio(self) -> float:
        """A streamed run's windows hold one candidate batch: ``1 / fraction`` rows per selected row."""
        return 1.0 / self.params.fraction

    def reset_pool(self) -> None:
        self.irreducible = self.known = self.source = None
        self.passes = PoolPasses()

    def state_dict(self) -> dict[str, Any]:
        return {
            "irreducible": self.irreducible,
            "known": self.known,
            "source": self.source,
            "passes": self.passes.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.irreducible, self.known, self.source = state["irreducible"], state["known"], state["source"]
        self.passes.load_state_dict(state["passes"])
        if self.source is not None and self.source != self.reference_model():
            logger.warning(
                "rho_loss: the checkpoint's irreducible losses came from %s, this run's IL model is %s; "
                "they are dropped and computed again",
                self.source,
                self.reference_model(),
            )
            self.irreducible = self.known = self.source = None
