"""The mix driver: proportions over domains, per the stage's schedule.

Initial proportions from step 1; each update replaces them from its first step. A mixer
that :class:`~datasteer.mixers.base.ObservesSteps` gets each step's per-domain statistics
(summed over micro-batches and ranks) before any update; one that
:class:`~datasteer.mixers.base.ShapesDomainLoss` weights the training loss per domain.

A trained sample whose loss, token count or excess loss is not finite is left out of the
statistics and counted (``nonfinite`` in the next update's record). A step without one
finite sample is not observed at all; an update that follows only such steps keeps the
proportions in force (so does one whose mixer raises
:class:`~datasteer.errors.NonFiniteInputError`), with a warning and ``kept: true``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from datasteer import dist
from datasteer.capabilities import ComparesToReference
from datasteer.drivers.base import Driver, OpsFactory, TrainedBatch
from datasteer.errors import NonFiniteInputError, SteeringStateError
from datasteer.mixers.base import (
    SUM_TOLERANCE,
    DomainStats,
    MixContext,
    Mixer,
    ObservesSteps,
    ShapesDomainLoss,
)
from datasteer.rng import torch_generator
from datasteer.samplers import MixtureSampler

logger = logging.getLogger(__name__)


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().double().cpu().numpy()


class MixDriver(Driver[Mixer]):
    """Runs a :class:`~datasteer.mixers.base.Mixer`."""

    paradigm = "mix"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # samples, loss sum, tokens, token-loss sum, excess-loss sum and samples left out
        # (non-finite) per domain, of the current step
        self._step_stats = np.zeros((6, self.run.num_domains), dtype=np.float64)
        self._nonfinite = 0  # samples left out since the last update's record
        self._observed = 0  # steps observed (with a finite sample) since the last update

    @property
    def sampler(self) -> MixtureSampler:
        assert isinstance(self.run.sampler, MixtureSampler)
        return self.run.sampler

    @classmethod
    def uses_sample_losses(cls, algorithm: Any) -> bool:
        return isinstance(algorithm, ObservesSteps | ShapesDomainLoss)

    @property
    def weights_loss(self) -> bool:
        return isinstance(self.algorithm, ShapesDomainLoss)

    def reference_model(self) -> str | None:
        return self.algorithm.reference_model() if isinstance(self.algorithm, ComparesToReference) else None

    def learned(self) -> dict[str, Any] | None:
        if not isinstance(self.algorithm, ShapesDomainLoss):
            return None
        learned = self.algorithm.learned_proportions()
        if learned is None:
            return None
        return {
            "algorithm": self.stage.algorithm,
            "domains": list(self.run.domain_names),
            "proportions": [float(p) for p in self._check(learned)],
        }

    # -- events ----------------------------------------------------------------------------
    def begin(self) -> list[dict[str, Any]]:
        warmup_end = self.schedule.first_step(0) - 1 if self.algorithm.adaptive else self.run.max_steps
        ctx = self._context(update=-1, step=0, first=1, last=warmup_end, ops=None)
        props = dist.broadcast_object(self._check(self.algorithm.initial(ctx)))
        self.sampler.add_plan(1, props)
        if warmup_end < 1:  # update 0 replaces it before any step trains
            return []
        return [{"step": 0, "update": -1, "first_step": 1, "last_step": warmup_end, **self._payload(props)}]

    def decide(self, step: int, ops: OpsFactory) -> list[dict[str, Any]]:
        if isinstance(self.algorithm, ObservesSteps) and step > 0:
            stats, left_out = self._domain_stats(step)
            self._nonfinite += left_out
            if stats.samples.sum() > 0:
                self.algorithm.observe(stats)
                self._observed += 1
            elif left_out:
                logger.warning(
                    "%s: every loss of step %d is NaN or infinite; the step is left out of its statistics",
                    self.stage.algorithm,
                    step,
                )
        if not self.algorithm.adaptive:
            return []
        return [self._update(u, step, ops) for u in self.schedule.updates_decided_at(step, self.run.max_steps)]

    def _update(self, update: int, step: int, ops: OpsFactory) -> dict[str, Any]:
        first = self.schedule.first_step(update)
        last = self.schedule.last_step(update, self.run.max_steps)
        ctx = self._context(update, step, first, last, ops)
        started = time.perf_counter()
        observes = isinstance(self.algorithm, ObservesSteps)
        kept = observes and self._observed == 0 and self._nonfinite > 0
        if not kept:
            try:
                props = self._check(self.algorithm.update(ctx))
            except NonFiniteInputError as err:
                logger.warning("%s: %s", self.stage.algorithm, err)
                kept = True
        if kept:  # no finite input since the last update: the proportions in force stand
            props = ctx.proportions.numpy()
            logger.warning(
                "%s: update %d has no finite loss to learn from (%d samples left out); the proportions in force "
                "are kept",
                self.stage.algorithm,
                update,
                self._nonfinite,
            )
        props = dist.broadcast_object(props)
        self.sampler.add_plan(first, props)
        seconds = round(time.perf_counter() - started, 6)
        record: dict[str, Any] = {
            "step": step,
            "update": update,
            "first_step": first,
            "last_step": last,
            **self._payload(props),
        }
        if observes:
            record["nonfinite"] = self._nonfinite
        if kept:
            record["kept"] = True
        self._nonfinite = self._observed = 0
        return {**record, "seconds": seconds}

    def _context(self, update: int, step: int, first: int, last: int, ops: OpsFactory) -> MixContext:
        run = self.run
        sizes = tuple(len(m) for m in self.sampler.members)  # 0 for a streamed domain (size unknown)
        current = (
            torch.from_numpy(self.sampler.plan_at(first)[1]).clone()
            if update >= 0
            else torch.full((len(sizes),), 1.0 / len(sizes), dtype=torch.float64)
        )
        return MixContext(
            step=step,
            first_step=first,
            last_step=max(first, last),
            max_steps=run.max_steps,
            update=update,
            domain_names=run.domain_names,
            domain_sizes=sizes,
            proportions=current,
            domains=torch.from_numpy(run.domains),
            generator=torch_generator(run.seed, "mix", update),
            ops=self.model_ops(self.algorithm.needs_model and update >= 0, ops),
        )

    # -- per-batch ------------------------------------------------------------------------
    def observe(self, batch: TrainedBatch) -> None:
        if batch.losses is None or batch.tokens is None or not self.needs_sample_losses:
            return
        k = self.run.num_domains
        loss, count = _numpy(batch.losses), _numpy(batch.tokens)
        excess = _numpy(batch.excess) if batch.excess is not None else np.zeros_like(loss)
        # A non-finite number is left out, not zeroed: the sample is counted apart instead.
        finite = np.isfinite(loss) & np.isfinite(count) & np.isfinite(excess) & np.isfinite(loss * count)
        ids = batch.domains[finite]
        loss, count, excess = loss[finite], count[finite], excess[finite]
        self._step_stats += np.stack(
            [
                np.bincount(ids, minlength=k),
                np.bincount(ids, weights=loss, minlength=k),
                np.bincount(ids, weights=count, minlength=k),
                np.bincount(ids, weights=loss * count, minlength=k),
                np.bincount(ids, weights=excess, minlength=k),
                np.bincount(batch.domains[~finite], minlength=k),
            ]
        )

    def _domain_stats(self, step: int) -> tuple[DomainStats, int]:
        """The step's statistics over every micro-batch and rank, and how many samples were left out."""
        total = dist.all_reduce(torch.from_numpy(self._step_stats.copy()))
        self._step_stats[:] = 0
        stats = DomainStats(
            step=step,
            proportions=torch.from_numpy(self.sampler.plan_at(step)[1]).clone(),
            samples=total[0],
            loss_sum=total[1],
            tokens=total[2],
            token_loss_sum=total[3],
            excess_sum=total[4] if self.reference_model() is not None else None,
        )
        return stats, int(total[5].sum())

    def loss_weights(self, step: int, batch: TrainedBatch) -> torch.Tensor | None:
        """``w_i = alpha_d * B / n_d`` for a sample of domain d, ``n_d`` the step's domain-d samples
        over all micro-batches and ranks, so that ``(1/B) sum_i w_i l_i = sum_d alpha_d L_d``."""
        if not isinstance(self.algorithm, ShapesDomainLoss):
            return None
        alpha = self.algorithm.loss_weights()
        if alpha is None or alpha.shape != (self.run.num_domains,):
            raise SteeringStateError(f"{self.stage.algorithm} returned invalid loss weights {alpha}")
        counts = torch.from_numpy(self.sampler.domain_counts(step)).double()
        per_domain = torch.where(counts > 0, alpha.double() * self.run.global_batch / counts.clamp_min(1), 0.0)
        # (a sample whose loss is not finite gets weight 0 from the controller)
        return per_domain[torch.from_numpy(batch.domains)]

    # -- records ---------------------------------------------------------------------------
    def _payload(self, props: np.ndarray) -> dict[str, Any]:
        payload: dict[str, Any] = {"proportions": self.run.per_domain(props)}
        for key, value in self.algorithm.report().items():
            if isinstance(value, torch.Tensor) and value.shape == (self.run.num_domains,):
                payload[key] = self.run.per_domain(value.tolist())
            else:
                payload[key] = value.tolist() if isinstance(value, torch.Tensor) else float(value)
        return payload

    def _check(self, props: torch.Tensor) -> np.ndarray:
        arr = torch.as_tensor(props, dtype=torch.float64).detach().cpu().numpy()
        k = self.run.num_domains
        if arr.shape != (k,) or not np.isfinite(arr).all() or (arr < 0).any():
            raise SteeringStateError(f"{self.stage.algorithm} returned invalid proportions {arr.tolist()}")
        if abs(arr.sum() - 1.0) > SUM_TOLERANCE * 100:
            raise SteeringStateError(f"{self.stage.algorithm} returned proportions summing to {arr.sum()}")
        result: np.ndarray = arr / arr.sum()
        return result
