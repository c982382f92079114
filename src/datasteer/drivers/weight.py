"""The weight driver: a loss weight for every sample of every micro-batch after the warm-up.

Steps ``1..warmup_steps`` train with weight 1. Each micro-step, the samples of every rank
are gathered (the data-parallel micro-batch), the weighter weighs them all, and each rank
keeps its own samples' weights, so N ranks give the weights of one rank with the whole
batch. After each optimizer step the statistics of that step's weights (mean, min, max,
effective sample size, mean per domain) become one record. A weighter that refreshes from
the model (e.g. ADAPT's anchors) does so at train begin and every ``refresh_every`` steps,
each refresh a record of its own.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from datasteer import dist
from datasteer.capabilities import ComparesToReference
from datasteer.drivers.base import Driver, OpsFactory, TrainedBatch
from datasteer.errors import SteeringStateError
from datasteer.ops.embeddings import Pooling
from datasteer.rng import torch_generator
from datasteer.weighters.base import RefreshesFromModel, UsesBatchEmbeddings, WeightContext, Weighter


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
        domains = torch.from_numpy(self.run.domains[indices.numpy()])
        ctx = WeightContext(
            step=step,
            max_steps=self.run.max_steps,
            losses=losses,
            indices=indices,
            domains=domains,
            generator=torch_generator(self.run.seed, "weight", step, self._micro),
            embeddings=embeddings,
            reference_losses=reference,
            domain_names=self.run.domain_names,
        )
        self._micro += 1
        weights = torch.as_tensor(self.algorithm.weigh(ctx)).detach().double().cpu()
        if weights.shape != losses.shape or not torch.isfinite(weights).all() or (weights < 0).any():
            raise SteeringStateError(
                f"{self.stage.algorithm} returned invalid weights (shape {tuple(weights.shape)}, "
                f"expected {tuple(losses.shape)}, finite and >= 0)"
            )
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
