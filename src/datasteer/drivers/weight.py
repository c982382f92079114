"""The weight driver: a loss weight for every sample of every micro-batch after the warm-up.

Steps ``1..warmup_steps`` train with weight 1. Each micro-step, the samples of every rank
are gathered (the data-parallel micro-batch), the weighter weighs them all, and each rank
keeps its own samples' weights, so N ranks give the weights of one rank with the whole
batch. After each optimizer step the statistics of that step's weights (mean, min, max,
effective sample size, mean per domain) become one record. A weighter that refreshes from
the model (e.g. ADAPT's anchors) does so at train begin and every ``refresh_every`` steps,
each refresh a record of its own.

A sample whose loss (or reference loss, or embedding) is not finite is left out: the
weighter weighs the other samples, the left-out one gets weight 0, and the step's record
counts it (``nonfinite``). A micro-batch without one finite sample trains with weight 1
(its loss stays non-finite, for the run's divergence check), with a warning.
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
from datasteer.errors import SteeringStateError
from datasteer.finite import finite_rows
from datasteer.ops.embeddings import Pooling
from datasteer.rng import torch_generator
from datasteer.weighters.base import RefreshesFromModel, UsesBatchEmbeddings, WeightContext, Weighter

logger = logging.getLogger(__name__)


class WeightDriver(Driver[Weighter]):
    """Runs a :class:`~datasteer.weighters.base.Weighter`."""

    paradigm = "weight"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset()

    def _reset(self) -> None:
        k = self.run.num_domains
        self._sum = self._squares = self._count = 0.0
        self._low, self._high = float("inf"), float("-inf")
        self._domain_sum, self._domain_count = np.zeros(k), np.zeros(k)
        self._seconds = 0.0
        self._micro = 0
        self._nonfinite = 0

    @classmethod
    def uses_sample_losses(cls, algorithm: Any) -> bool:
        return True

    @property
    def weights_loss(self) -> bool:
        return True

    def reference_model(self) -> str | None:
        return self.algorithm.reference_model() if isinstance(self.algorithm, ComparesToReference) else None

    def embedding_layer(self) -> tuple[int, Pooling] | None:
        return self.algorithm.embedding_layer() if isinstance(self.algorithm, UsesBatchEmbeddings) else None

    def loss_weights(self, step: int, batch: TrainedBatch) -> torch.Tensor | None:
        if batch.losses is None:
            raise SteeringStateError(f"{self.stage.algorithm} needs the batch's per-sample losses")
        if step <= self.stage.warmup_steps:
            return None
        started = time.perf_counter()
        # Every column the weighter sees, gathered over the ranks in one collective: loss, pool
        # index, then the reference loss and the embedding when the weighter asks for them.
        columns = [batch.losses.detach().float(), torch.from_numpy(batch.indices)]
        if self.reference_model() is not None:
            if batch.reference_losses is None:
                raise SteeringStateError(f"{self.stage.algorithm} needs the reference model's losses")
            columns.append(batch.reference_losses.detach().float())
        if self.embedding_layer() is not None:
            if batch.embeddings is None:
                raise SteeringStateError(f"{self.stage.algorithm} needs the batch's embeddings; none were computed")
            columns.append(batch.embeddings.detach().float())
        table = torch.cat([c.detach().cpu().double().reshape(len(batch.indices), -1) for c in columns], dim=1)
        rows, mine = dist.all_gather_rows(table)
        losses, indices = rows[:, 0].float(), rows[:, 1].long()
        reference = rows[:, 2].float() if self.reference_model() is not None else None
        embeddings = rows[:, 2 + (reference is not None) :].float() if self.embedding_layer() is not None else None
        domains = torch.from_numpy(self.run.domain_of(indices.numpy()))
        # Every column the weighter reads must be finite for a sample to be weighed.
        finite = finite_rows(rows[:, 0]) & finite_rows(rows[:, 2:])
        generator = torch_generator(self.run.seed, "weight", step, self._micro)
        self._micro += 1
        self._nonfinite += int((~finite).sum())
        if not finite.any():
            logger.warning(
                "%s: every loss of a micro-batch of step %d is NaN or infinite; it trains with weight 1",
                self.stage.algorithm,
                step,
            )
            weights = torch.ones(len(losses), dtype=torch.float64)
        else:
            ctx = WeightContext(
                step=step,
                max_steps=self.run.max_steps,
                losses=losses[finite],
                indices=indices[finite],
                domains=domains[finite],
                generator=generator,
                embeddings=embeddings[finite] if embeddings is not None else None,
                reference_losses=reference[finite] if reference is not None else None,
                domain_names=self.run.domain_names,
            )
            weighed = torch.as_tensor(self.algorithm.weigh(ctx)).detach().double().cpu()
            if weighed.shape != ctx.losses.shape or not torch.isfinite(weighed).all() or (weighed < 0).any():
                raise SteeringStateError(
                    f"{self.stage.algorithm} returned invalid weights (shape {tuple(weighed.shape)}, "
                    f"expected {tuple(ctx.losses.shape)}, finite and >= 0)"
                )
            weights = torch.zeros(len(losses), dtype=torch.float64)
            weights[finite] = weighed
        self._note(weights, domains.numpy())
        self._seconds += time.perf_counter() - started
        return weights[mine]

    def _note(self, weights: torch.Tensor, domains: np.ndarray) -> None:
        """Add a gathered micro-batch's weights to the step's statistics (the same on every rank)."""
        w = weights.numpy()
        self._sum += float(w.sum())
        self._squares += float((w * w).sum())
        self._count += len(w)
        self._low, self._high = min(self._low, float(w.min())), max(self._high, float(w.max()))
        self._domain_sum += np.bincount(domains, weights=w, minlength=self.run.num_domains)
        self._domain_count += np.bincount(domains, minlength=self.run.num_domains)

    def decide(self, step: int, ops: OpsFactory) -> list[dict[str, Any]]:
        events = []
        if step > 0 and self._count > 0:  # no record during the warm-up (weight 1)
            per_domain = {
                name: round(float(s / c), 8)
                for name, s, c in zip(self.run.domain_names, self._domain_sum, self._domain_count, strict=True)
                if c > 0
            }
            events.append(
                {
                    "step": step,
                    "weight_mean": self._sum / self._count,
                    "weight_min": self._low,
                    "weight_max": self._high,
                    # Kish's effective sample size over the step, as a fraction of its samples
                    "weight_ess": (self._sum**2 / self._squares / self._count) if self._squares > 0 else 0.0,
                    "weight_domain_mean": per_domain,
                    "nonfinite": self._nonfinite,
                    "seconds": round(self._seconds, 6),
                }
            )
        self._reset()
        if isinstance(self.algorithm, RefreshesFromModel) and step < self.run.max_steps:
            every = self.algorithm.refresh_every()
            if step % every == 0:
                started = time.perf_counter()
                payload = self.algorithm.refresh(self.model_ops(True, ops))
                events.append(
                    {
                        "step": step,
                        "refresh": step // every,
                        **payload,
                        "seconds": round(time.perf_counter() - started, 6),
                    }
                )
        return events
