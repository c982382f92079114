"""The steering controller: when to act, agreement across ranks, the event log and state.

Written once for every algorithm. The schedule, in optimizer steps (1-based):

* steps ``1 .. warmup_steps`` train on the warm-up plan (a shuffle of the whole pool for
  selection, the mixer's initial proportions for mixing, weight 1 for weighting);
* update ``u`` (0, 1, ...) shapes steps ``warmup_steps + u * update_every + 1`` onwards,
  for ``update_every`` steps (the last update, if ``max_updates`` is reached, stays in
  force to the end);
* the data loader prefetches, so an update is **decided** ``lag`` steps before the first
  step it shapes, after step ``first_step - 1 - lag`` (at train begin if that is <= 0).
  With the default ``lag = 1`` the model an update sees is one step older than the step
  it first shapes; the warm-up and update lengths stay exact.

Weighting acts in every micro-batch of steps after the warm-up (``lag`` does not apply).
Each update is computed on every rank (model operations shard their work and gather), then
rank 0's result is broadcast so that every rank serves the same stream.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from datasteer import dist
from datasteer.config import SteeringConfig
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.mixers.base import SUM_TOLERANCE, DomainStats, MixContext, Mixer
from datasteer.ops import ModelOps
from datasteer.registry import registry_for
from datasteer.rng import torch_generator
from datasteer.runlog import RunLog
from datasteer.samplers import MixtureSampler, SelectionSampler, SteeringSampler
from datasteer.selectors.base import SelectContext, Selector
from datasteer.weighters.base import WeightContext, Weighter

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class Schedule:
    """When updates happen (see the module docstring)."""

    warmup_steps: int
    update_every: int
    max_updates: int | None
    lag: int

    def first_step(self, update: int) -> int:
        """First step shaped by ``update``."""
        return self.warmup_steps + update * self.update_every + 1

    def last_step(self, update: int, max_steps: int) -> int:
        """Last step shaped by ``update`` before the next one (or the end)."""
        if self.max_updates is not None and update + 1 >= self.max_updates:
            return max_steps
        return min(self.first_step(update + 1) - 1, max_steps)

    def decided_at(self, update: int) -> int:
        """Step after which ``update`` is computed (0: at train begin)."""
        return max(0, self.first_step(update) - 1 - self.lag)

    def total_updates(self, max_steps: int) -> int:
        """How many updates a run of ``max_steps`` steps makes."""
        possible = max(0, -(-(max_steps - self.warmup_steps) // self.update_every))
        return possible if self.max_updates is None else min(possible, self.max_updates)

    def updates_decided_at(self, step: int, max_steps: int) -> list[int]:
        """The updates to compute after ``step`` (0: at train begin), in order."""
        result = []
        update = 0
        while self.max_updates is None or update < self.max_updates:
            if self.first_step(update) > max_steps or self.decided_at(update) > step:
                break
            if self.decided_at(update) == step:
                result.append(update)
            update += 1
        return result


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().double().cpu().numpy()


def digest(indices: np.ndarray) -> str:
    """Short stable fingerprint of an index array (order-sensitive)."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


class SteeringController:
    """Runs one steering algorithm inside a training run.

    Args:
        config: the parsed ``datasteer:`` block.
        domains: domain id of each pool sample, ``(N,)``.
        domain_names: names of the domain ids.
        global_batch: samples per optimizer step over all ranks and micro-batches.
        seed: seed of every steering draw.
        lag: steps between deciding and using an update (>= 1).
        log: the run record (``None``: no file).
    """

    def __init__(
        self,
        config: SteeringConfig,
        *,
        domains: np.ndarray,
        domain_names: Sequence[str],
        global_batch: int,
        seed: int,
        lag: int,
        log: RunLog | None = None,
    ) -> None:
        self.config = config
        self.domains = np.asarray(domains, dtype=np.int64)
        self.domain_names = tuple(domain_names)
        self.global_batch = global_batch
        self.seed = seed
        self.log = log
        self.schedule = Schedule(config.warmup_steps, config.update_every, config.max_updates, lag)
        self.algorithm = registry_for(config.paradigm).build(config.algorithm, config.params)
        self.max_steps = 0
        self._resumed_at: int | None = None
        self._served = np.zeros(len(self.domain_names), dtype=np.int64)
        # samples, loss sum, tokens, token-loss sum, excess-loss sum per domain, of the current step
        self._step_stats = np.zeros((5, len(self.domain_names)), dtype=np.float64)
        self._weight_stats: list[float] | None = None  # sum, count, min, max of this step
        self._weight_seconds = 0.0
        self._micro = 0
        self.sampler: SteeringSampler | None = None
        if isinstance(self.algorithm, Mixer):
            self.algorithm.check_domains(self.domain_names)
            sizes = np.bincount(self.domains, minlength=len(self.domain_names))
            empty = [n for n, size in zip(self.domain_names, sizes, strict=True) if size == 0]
            if empty:
                raise ConfigError(f"dataset: domains {empty} have no training samples; a mixer needs every domain")
            self.sampler = MixtureSampler(self.domains, len(self.domain_names), global_batch, seed)
        elif isinstance(self.algorithm, Selector):
            self.sampler = SelectionSampler(len(self.domains), global_batch, seed)

    @property
    def paradigm(self) -> str:
        return self.config.paradigm

    @property
    def needs_sample_losses(self) -> bool:
        """Whether training batches need per-sample losses (for weights or for a mixer)."""
        return self.weights_samples or (isinstance(self.algorithm, Mixer) and self.algorithm.observes)

    @property
    def weights_samples(self) -> bool:
        """Whether the training loss is reweighted per sample (by a weighter, or per domain by a mixer)."""
        return isinstance(self.algorithm, Weighter) or (
            isinstance(self.algorithm, Mixer) and self.algorithm.weights_loss
        )

    @property
    def reference_model(self) -> str | None:
        """Path of the reference model whose per-token losses the mixer needs, if any."""
        return self.algorithm.reference_model() if isinstance(self.algorithm, Mixer) else None

    def learned_proportions(self) -> dict[str, Any] | None:
        """What a mixer learned over the run (DoReMi's averaged weights), for a later static run."""
        if not isinstance(self.algorithm, Mixer):
            return None
        learned = self.algorithm.learned_proportions()
        if learned is None:
            return None
        props = self._check_proportions(learned)
        return {
            "algorithm": self.config.algorithm,
            "domains": list(self.domain_names),
            "proportions": [float(p) for p in props],
        }

    # -- training events ---------------------------------------------------------------
    def begin(self, max_steps: int, ops: Callable[[], ModelOps] | None = None) -> list[dict[str, Any]]:
        """At train begin: set the initial plan and compute updates due before step 1."""
        self.max_steps = max_steps
        if self._resumed_at is not None:
            return []
        if self.log is not None:
            self.log.start_fresh()
        events: list[dict[str, Any]] = []
        if isinstance(self.algorithm, Mixer):
            assert isinstance(self.sampler, MixtureSampler)
            adaptive = self.algorithm.adaptive
            warmup_end = self.schedule.first_step(0) - 1 if adaptive else max_steps
            ctx = self._mix_context(update=-1, step=0, first=1, last=warmup_end, ops=None)
            props = dist.broadcast_object(self._check_proportions(self.algorithm.initial(ctx)))
            self.sampler.add_plan(1, props)
            if warmup_end >= 1:  # otherwise update 0 replaces it before any step trains
                record = {"step": 0, "update": -1, "first_step": 1, "last_step": warmup_end}
                events.append(self._record({**record, **self._mix_payload(props)}))
        return events + self.step_end(0, ops)

    def step_end(self, step: int, ops: Callable[[], ModelOps] | None = None) -> list[dict[str, Any]]:
        """After optimizer step ``step`` (0: train begin): compute the updates due now."""
        if isinstance(self.algorithm, Weighter):
            return self._weight_event(step) if step > 0 else []
        if isinstance(self.algorithm, Mixer) and self.algorithm.observes and step > 0:
            self.algorithm.observe(self._domain_stats(step))
        if isinstance(self.algorithm, Mixer) and not self.algorithm.adaptive:
            return []
        return [self._update(update, step, ops) for update in self.schedule.updates_decided_at(step, self.max_steps)]

    def _update(self, update: int, step: int, ops: Callable[[], ModelOps] | None) -> dict[str, Any]:
        first = self.schedule.first_step(update)
        last = self.schedule.last_step(update, self.max_steps)
        model_ops = ops() if (ops is not None and self.algorithm.needs_model) else None
        if self.algorithm.needs_model and model_ops is None:
            raise SteeringStateError(f"{self.config.algorithm} needs the model, but no model operations were given")
        started = time.perf_counter()
        assert self.sampler is not None
        if isinstance(self.algorithm, Selector):
            ctx = SelectContext(
                step=step,
                first_step=first,
                last_step=last,
                max_steps=self.max_steps,
                update=update,
                total_updates=self.schedule.total_updates(self.max_steps),
                num_samples=self.global_batch * (last - first + 1),
                pool_size=len(self.domains),
                domains=torch.from_numpy(self.domains),
                domain_names=self.domain_names,
                generator=torch_generator(self.seed, "select", update),
                ops=model_ops,
            )
            chosen = self._check_selection(self.algorithm.select(ctx))
            chosen = dist.broadcast_object(chosen)
            self.sampler.add_plan(first, chosen)
            payload = self._select_payload(chosen)
        else:
            assert isinstance(self.algorithm, Mixer)
            mix_ctx = self._mix_context(update, step, first, last, model_ops)
            props = dist.broadcast_object(self._check_proportions(self.algorithm.update(mix_ctx)))
            self.sampler.add_plan(first, props)
            payload = self._mix_payload(props)
        seconds = time.perf_counter() - started
        record = {"step": step, "update": update, "first_step": first, "last_step": last, **payload}
        record["seconds"] = round(seconds, 6)
        return self._record(record)

    def _mix_context(self, update: int, step: int, first: int, last: int, ops: ModelOps | None) -> MixContext:
        sizes = tuple(int((self.domains == d).sum()) for d in range(len(self.domain_names)))
        assert isinstance(self.sampler, MixtureSampler)
        current = (
            torch.from_numpy(self.sampler.plan_at(first)[1]).clone()
            if update >= 0
            else torch.full((len(sizes),), 1.0 / len(sizes), dtype=torch.float64)
        )
        return MixContext(
            step=step,
            first_step=first,
            last_step=max(first, last),
            max_steps=self.max_steps,
            update=update,
            domain_names=self.domain_names,
            domain_sizes=sizes,
            proportions=current,
            domains=torch.from_numpy(self.domains),
            generator=torch_generator(self.seed, "mix", update),
            ops=ops,
        )

    # -- per-batch hooks ---------------------------------------------------------------
    def observe(
        self,
        indices: torch.Tensor,
        losses: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        excess: torch.Tensor | None = None,
    ) -> None:
        """Note a trained micro-batch: its domains (reported with the next event) and, when
        given, its per-sample token-mean losses, labelled-token counts and summed excess
        losses over a reference model (for mixers)."""
        ids = self.domains[indices.detach().cpu().numpy()]
        k = len(self.domain_names)
        self._served += np.bincount(ids, minlength=k)
        if losses is not None and tokens is not None:
            loss, count = _numpy(losses), _numpy(tokens)
            self._step_stats += np.stack(
                [
                    np.bincount(ids, minlength=k),
                    np.bincount(ids, weights=loss, minlength=k),
                    np.bincount(ids, weights=count, minlength=k),
                    np.bincount(ids, weights=loss * count, minlength=k),
                    np.bincount(ids, weights=_numpy(excess), minlength=k) if excess is not None else np.zeros(k),
                ]
            )

    def _domain_stats(self, step: int) -> DomainStats:
        total = dist.all_reduce(torch.from_numpy(self._step_stats.copy()))
        self._step_stats[:] = 0
        assert self.sampler is not None
        return DomainStats(
            step=step,
            proportions=torch.from_numpy(self.sampler.plan_at(step)[1]).clone(),
            samples=total[0],
            loss_sum=total[1],
            tokens=total[2],
            token_loss_sum=total[3],
            excess_sum=total[4] if self.reference_model is not None else None,
        )

    def sample_weights(self, step: int, losses: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Weights of one micro-batch of step ``step`` (1 during a weighter's warm-up)."""
        if isinstance(self.algorithm, Mixer) and self.algorithm.weights_loss:
            return self._domain_loss_weights(step, losses, indices)
        if not isinstance(self.algorithm, Weighter) or step <= self.config.warmup_steps:
            return torch.ones_like(losses)
        started = time.perf_counter()
        idx = indices.detach().cpu()
        ctx = WeightContext(
            step=step,
            max_steps=self.max_steps,
            losses=losses.detach(),
            indices=idx,
            domains=torch.from_numpy(self.domains[idx.numpy()]),
            generator=torch_generator(self.seed, "weight", step, dist.rank(), self._micro),
        )
        self._micro += 1
        weights = self.algorithm.weigh(ctx).detach().to(losses.device, losses.dtype)
        if weights.shape != losses.shape or not torch.isfinite(weights).all() or (weights < 0).any():
            raise SteeringStateError(
                f"{self.config.algorithm} returned invalid weights (shape {tuple(weights.shape)}, "
                f"expected {tuple(losses.shape)}, finite and >= 0)"
            )
        w = weights.detach().float().cpu()
        stats = [float(w.sum()), float(w.numel()), float(w.min()), float(w.max())]
        if self._weight_stats is None:
            self._weight_stats = stats
        else:
            s = self._weight_stats
            self._weight_stats = [s[0] + stats[0], s[1] + stats[1], min(s[2], stats[2]), max(s[3], stats[3])]
        self._weight_seconds += time.perf_counter() - started
        return weights

    def _domain_loss_weights(self, step: int, losses: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``w_i = alpha_d * B / n_d`` for a sample of domain d, ``n_d`` the step's domain-d samples
        over all micro-batches and ranks, so that ``(1/B) sum_i w_i l_i = sum_d alpha_d L_d``."""
        assert isinstance(self.algorithm, Mixer) and isinstance(self.sampler, MixtureSampler)
        alpha = self.algorithm.loss_weights()
        if alpha is None or alpha.shape != (len(self.domain_names),):
            raise SteeringStateError(f"{self.config.algorithm} returned invalid loss weights {alpha}")
        counts = torch.from_numpy(self.sampler.domain_counts(step)).double()
        per_domain = torch.where(counts > 0, alpha.double() * self.global_batch / counts.clamp_min(1), 0.0)
        ids = torch.from_numpy(self.domains[indices.detach().cpu().numpy()])
        return per_domain[ids].to(losses.device, losses.dtype)

    def _weight_event(self, step: int) -> list[dict[str, Any]]:
        s = self._weight_stats or [0.0, 0.0, float("inf"), float("-inf")]
        total = dist.all_reduce(torch.tensor(s[:2], dtype=torch.float64))
        low = dist.all_reduce(torch.tensor([s[2]], dtype=torch.float64), "min")
        high = dist.all_reduce(torch.tensor([s[3]], dtype=torch.float64), "max")
        self._weight_stats, self._micro = None, 0
        if total[1] == 0:  # warm-up (weight 1), or no weighted batch on any rank
            return []
        seconds, self._weight_seconds = self._weight_seconds, 0.0
        record = {
            "step": step,
            "weight_mean": float(total[0] / total[1]),
            "weight_min": float(low[0]),
            "weight_max": float(high[0]),
            "seconds": round(seconds, 6),
        }
        return [self._record(record)]

    # -- records -------------------------------------------------------------------------
    def _record(self, record: dict[str, Any]) -> dict[str, Any]:
        served = dist.all_reduce(torch.from_numpy(self._served.copy())).numpy()
        self._served[:] = 0
        full = {"step": record.pop("step"), "paradigm": self.paradigm, "algorithm": self.config.algorithm}
        full.update(record)
        full["served"] = dict(zip(self.domain_names, (int(c) for c in served), strict=True))
        full["seconds"] = full.pop("seconds", 0.0)
        if self.log is not None:
            self.log.write(full)
        logger.info("steering %s", full)
        return full

    def _per_domain(self, values: Any) -> dict[str, float]:
        return {n: round(float(v), 8) for n, v in zip(self.domain_names, values, strict=True)}

    def _mix_payload(self, props: np.ndarray) -> dict[str, Any]:
        payload: dict[str, Any] = {"proportions": self._per_domain(props)}
        assert isinstance(self.algorithm, Mixer)
        for key, value in self.algorithm.report().items():
            if isinstance(value, torch.Tensor) and value.shape == (len(self.domain_names),):
                payload[key] = self._per_domain(value.tolist())
            else:
                payload[key] = value.tolist() if isinstance(value, torch.Tensor) else float(value)
        return payload

    def _select_payload(self, chosen: np.ndarray) -> dict[str, Any]:
        counts = np.bincount(self.domains[chosen], minlength=len(self.domain_names))
        return {
            "selected": len(chosen),
            "unique": len(np.unique(chosen)),
            "digest": digest(chosen),
            "domain_counts": dict(zip(self.domain_names, (int(c) for c in counts), strict=True)),
        }

    def _check_selection(self, chosen: torch.Tensor) -> np.ndarray:
        arr = torch.as_tensor(chosen).detach().cpu().numpy()
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise SteeringStateError(f"{self.config.algorithm} must return a non-empty 1-D integer tensor")
        if arr.min() < 0 or arr.max() >= len(self.domains):
            raise SteeringStateError(f"{self.config.algorithm} returned indices outside [0, {len(self.domains)})")
        return arr.astype(np.int64)

    def _check_proportions(self, props: torch.Tensor) -> np.ndarray:
        arr = torch.as_tensor(props, dtype=torch.float64).detach().cpu().numpy()
        k = len(self.domain_names)
        if arr.shape != (k,) or not np.isfinite(arr).all() or (arr < 0).any():
            raise SteeringStateError(f"{self.config.algorithm} returned invalid proportions {arr.tolist()}")
        if abs(arr.sum() - 1.0) > SUM_TOLERANCE * 100:
            raise SteeringStateError(f"{self.config.algorithm} returned proportions summing to {arr.sum()}")
        result: np.ndarray = arr / arr.sum()
        return result

    # -- state ---------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        """Everything needed to continue exactly after optimizer step ``step``."""
        return {
            "version": STATE_VERSION,
            "step": step,
            "paradigm": self.paradigm,
            "algorithm": self.config.algorithm,
            "algorithm_state": self.algorithm.state_dict(),
            "sampler": self.sampler.state_dict(step) if self.sampler is not None else None,
            "served": torch.from_numpy(self._served.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the run continues with step ``state['step'] + 1``."""
        if state.get("version") != STATE_VERSION:
            raise SteeringStateError(f"unsupported steering state version {state.get('version')}")
        for key in ("paradigm", "algorithm"):
            if state[key] != getattr(self.config, key):
                raise SteeringStateError(
                    f"the checkpoint was steered by {key}={state[key]!r}, this run uses {getattr(self.config, key)!r}"
                )
        self.algorithm.load_state_dict(state["algorithm_state"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        self._served = state["served"].numpy().astype(np.int64).copy()
        self._resumed_at = int(state["step"])
        if self.log is not None:
            self.log.truncate_after(self._resumed_at)
