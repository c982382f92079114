"""GREATS: pick, from a candidate batch, the sub-batch whose step lowers the target loss most."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError, NonFiniteInputError
from datasteer.finite import finite_rows
from datasteer.ops.gradients import DEFAULT_VMAP_CHUNK, GradFeatureConfig
from datasteer.ops.protocol import ModelOperations
from datasteer.registry import SELECTORS
from datasteer.selectors.base import PoolPasses, SelectContext, Selector, candidate_count, warn_if_no_choice

logger = logging.getLogger(__name__)

METHODS = ("auto", "vmap", "hooks", "loop", "dense", "logra")


@dataclass
class GreatsParams:
    """Parameters of :class:`GreatsSelector`."""

    fraction: float = doc(
        "Selected / candidates: each update scores ceil(selection / fraction) candidates and keeps "
        "`selection` of them (authors' code: 0.5).",
        default=0.5,
    )
    targets: int | None = doc(
        "Target rows whose mean gradient is the validation gradient: a fresh random subset of this many "
        "rows of the target sets per update (authors' code: 2 of 5); null: every row.",
        default=None,
    )
    learning_rate: float | None = doc(
        "eta of the second-order term; null: the live optimizer's learning rate when the selection is made "
        "(as the authors' code).",
        default=None,
    )
    proj_dim: int = doc("Dimension of the random projection of the gradients.", default=1024)
    method: str = doc(
        "Gradient-feature method: auto (hooks where every trainable parameter is a linear weight, e.g. "
        "LoRA, else vmap), hooks, vmap, loop, dense, or logra (linear layers only, Kronecker-projected: "
        "the cheapest for full fine-tuning).",
        default="auto",
    )
    projection_seed: int = doc("Seed of the projection (fixed for the run).", default=0)
    vmap_chunk: int | None = doc(
        "Samples whose per-sample gradients vmap/dense hold at a time (null: the whole batch).",
        default=DEFAULT_VMAP_CHUNK,
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"fraction: must be in (0, 1) (1 would keep every candidate), got {self.fraction}")
        if self.targets is not None and self.targets < 1:
            raise ConfigError(f"targets: must be >= 1 or null, got {self.targets}")
        if self.learning_rate is not None and not self.learning_rate >= 0:
            raise ConfigError(f"learning_rate: must be >= 0 or null, got {self.learning_rate}")
        if self.proj_dim < 1:
            raise ConfigError(f"proj_dim: must be >= 1, got {self.proj_dim}")
        if self.method not in METHODS:
            raise ConfigError(f"method: {self.method!r} is not allowed; choose one of {', '.join(map(repr, METHODS))}")
        if self.vmap_chunk is not None and self.vmap_chunk < 1:
            raise ConfigError(f"vmap_chunk: must be >= 1 or null, got {self.vmap_chunk}")

    def feature_config(self) -> GradFeatureConfig:
        """Plain projected gradients, not normalised: GREATS needs inner products, not cosines."""
        return GradFeatureConfig(
            method=self.method,  # type: ignore[arg-type]
            proj_dim=self.proj_dim,
            seed=self.projection_seed,
            normalize=False,
            vmap_chunk=self.vmap_chunk,
        )


def greedy_selection(candidates: torch.Tensor, target: torch.Tensor, lr: float, k: int) -> torch.Tensor:
    """GREATS's greedy choice of ``k`` rows of ``candidates``, in the order they are picked.

    With ``g_i`` the candidates' gradients and ``g_val`` the target gradient, the greedy step
    adds the candidate of largest marginal gain (divided by ``eta = lr``, which changes no
    choice for ``eta > 0`` and keeps the first-order ranking at ``eta = 0``)::

        gain(i | S) = <g_i, g_val> - eta * sum_{j in S} <g_i, g_j>

    Ties go to the lower position. A row that is not finite is never picked (fewer than
    ``k`` come back if fewer are finite).

    Args:
        candidates: ``(n, d)`` gradient features.
        target: ``(d,)`` the validation gradient (finite).
        lr: ``eta``, the step size of the update the selection is for.
        k: how many to pick.
    """
    features = candidates.double()
    finite = finite_rows(features)
    features = torch.where(finite.unsqueeze(1), features, 0.0)  # a NaN row must not reach the others' gains
    gains = torch.where(finite, features @ target.double(), -torch.inf)
    interaction = lr * (features @ features.T)
    picked: list[int] = []
    for _ in range(min(k, int(finite.sum()))):
        best = int(torch.argmax(gains))  # the first of equal maxima
        picked.append(best)
        gains -= interaction[best]
        gains[best] = -torch.inf
    return torch.tensor(picked, dtype=torch.long)


@SELECTORS.register("greats")
class GreatsSelector(Selector):
    """GREATS (Wang et al., NeurIPS 2024; OpenReview 232VcN8tSx): greedy sub-batch by a Taylor estimate of the target-loss drop.

    Each update draws a candidate batch of ``n_B = ceil(n_b / fraction)`` pool samples
    (successive slices of shuffled passes over the pool, as a training data loader serves
    them) and keeps ``n_b`` (the selection: global batch x steps of the update; with
    ``update_every: 1`` one step, as in the paper). The utility of a sub-batch ``S`` is the
    drop of the target (validation) loss after one SGD step on it, ``L_val(w) - L_val(w -
    eta sum_{z in S} g_z)``; its second-order Taylor expansion, with the Hessian taken as the
    identity, is ``eta sum_S <g_z, g_val> - (eta^2 / 2) |sum_S g_z|^2``. The greedy algorithm
    adds, ``n_b`` times, the candidate of largest marginal gain
    ``eta <g_z, g_val> - eta^2 sum_{z' in S} <g_z, g_z'>``, as the authors' released code
    computes it: the expansion's self term ``-(eta^2 / 2) |g_z|^2`` is left out (see
    :func:`greedy_selection`).

    ``g`` is the plain gradient of a sample's token-mean loss w.r.t. the trainable
    parameters (no Adam preconditioning: the expansion is of an SGD step), randomly
    projected to ``proj_dim`` dimensions without normalisation, which keeps inner products
    in expectation. ``g_val`` is the mean gradient of the target (evaluation) rows: all of
    them, or a fresh random subset of ``targets`` rows per update (the authors draw 2
    validation rows per step). ``eta`` is the live optimizer's learning rate. A candidate
    or target row whose feature is not finite is left out (counted as ``nonfinite``); with
    no finite target or candidate the selection in force stands.
    """

    Params = GreatsParams
    needs_model = True

    def __init__(self, params: GreatsParams) -> None:
        super().__init__(params)
        self.passes = PoolPasses()  # the candidate batches
        self._report: dict[str, int | float] = {}

    def report(self) -> dict[str, int | float]:
        """``nonfinite``: candidate and target rows of the latest update left out;
        ``targets``: target rows whose gradients made the validation gradient."""
        return dict(self._report)

    def select(self, ctx: SelectContext) -> torch.Tensor:
        p: GreatsParams = self.params
        ops = ctx.ops
        assert ops is not None
        if not ops.targets:
            raise ConfigError("greats: needs target samples; give the run an evaluation set (eval_dataset)")
        config = p.feature_config()
        target, left_out, used = self._target_gradient(ctx, ops, config)
        self._report = {"nonfinite": left_out, "targets": used}
        if target is None:
            raise NonFiniteInputError("no finite target gradient feature to select by")
        candidates = self.passes.next(ctx, candidate_count(ctx.num_samples, p.fraction))
        warn_if_no_choice("greats", ctx, len(candidates), subset=False)
        features = ops.gradient_features(candidates, config)
        bad = int((~finite_rows(features)).sum())
        self._report["nonfinite"] += bad
        if bad == len(candidates):
            raise NonFiniteInputError("no finite candidate gradient feature to select by")
        lr = p.learning_rate if p.learning_rate is not None else self._live_learning_rate(ops)
        picked = greedy_selection(features, target, lr, ctx.num_samples)
        if len(picked) < ctx.num_samples:
            logger.warning(
                "greats: %d samples needed but only %d candidates have a finite gradient feature; they are all kept",
                ctx.num_samples,
                len(picked),
            )
        return candidates[picked]

    def _target_gradient(
        self, ctx: SelectContext, ops: ModelOperations, config: GradFeatureConfig
    ) -> tuple[torch.Tensor | None, int, int]:
        """``(mean gradient of the chosen finite target rows or None, rows left out, rows used)``."""
        sizes = [len(t.dataset) for t in ops.targets]
        total = sum(sizes)
        wanted = self.params.targets
        chosen = (
            torch.arange(total)
            if wanted is None or wanted >= total
            else torch.randperm(total, generator=ctx.generator)[:wanted].sort().values
        )
        rows: list[torch.Tensor] = []
        start = 0
        for t, size in zip(ops.targets, sizes, strict=True):
            mine = chosen[(chosen >= start) & (chosen < start + size)] - start
            if len(mine):
                rows.append(t.gradient_features(mine, config))
            start += size
        features = torch.cat(rows).double()
        finite = finite_rows(features)
        left_out = int((~finite).sum())
        if not bool(finite.any()):
            return None, left_out, 0
        return features[finite].mean(dim=0), left_out, int(finite.sum())

    @staticmethod
    def _live_learning_rate(ops: ModelOperations) -> float:
        if ops.optimizer is None:
            raise ConfigError("greats: the live optimizer is unknown; give params.learning_rate")
        return float(ops.optimizer.param_groups[0]["lr"])

    def window_ratio(self) -> float:
        """A streamed run's windows hold one candidate batch: ``1 / fraction`` rows per selected row."""
        return 1.0 / self.params.fraction

    def reset_pool(self) -> None:
        self.passes = PoolPasses()

    def state_dict(self) -> dict[str, Any]:
        return {"passes": self.passes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.passes.load_state_dict(state["passes"])
