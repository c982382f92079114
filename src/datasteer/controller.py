"""The steering controller: runs a plan's stages in a training run.

Written once for every algorithm and combination. The stages compose in a fixed order,
each narrowing what the next sees (see the README's composition rule):

    mix     -> how many samples of each domain each step takes      (proportions)
    select  -> which samples fill each domain's share               (indices)
    weight  -> how much each trained sample's loss counts           (weights)

Each stage has its own driver (:mod:`datasteer.drivers`) and schedule
(:class:`~datasteer.schedule.Schedule`: warm-up, update every N steps, decided ``lag``
steps ahead of the first step it shapes). The controller owns what they share: the index
stream (one sampler), the run record, the per-batch bookkeeping, and the state saved with
each checkpoint. Every decision is computed on every rank (model operations shard their
work and gather), then rank 0's result is broadcast, so every rank serves the same stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from datasteer import dist
from datasteer.drivers import DRIVERS, Driver, RunInfo, TrainedBatch, digest
from datasteer.drivers.select import SelectDriver
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.mixers.base import Mixer
from datasteer.ops.protocol import ModelOperations
from datasteer.plan import SteeringPlan
from datasteer.runlog import RunLog
from datasteer.samplers import MixtureSampler, SelectionSampler
from datasteer.schedule import Schedule
from datasteer.selectors.base import Selector

__all__ = ["STATE_VERSION", "Schedule", "SteeringController", "digest"]

logger = logging.getLogger(__name__)

STATE_VERSION = 2


def check_streamable(plan: SteeringPlan, steps: int | None) -> None:
    """ConfigError unless ``plan`` can steer streamed domains for ``steps`` steps: a mix stage
    decides which stream each sample comes from, a selector chooses from candidate windows
    of the streams, and no stage needs the whole pool (each algorithm's ``check_streams``)."""
    if steps is None or steps < 1:
        raise ConfigError("max_steps: streamed domains have no length; set max_steps > 0")
    if "mix" not in plan.algorithms:
        raise ConfigError(
            f"{plan.config.describe()}: streamed domains need a mix stage (it decides which stream each "
            "sample comes from; for one stream, or fixed shares, use mix: {algorithm: static})"
        )
    selector = plan.algorithms.get("select")
    if isinstance(selector, Selector):
        selector.check_streams()
        if plan.config.stages["select"].max_updates is not None:
            raise ConfigError(
                "select.max_updates: with streamed domains every update chooses from a new candidate window, "
                "and a last selection cannot serve a stream for the rest of the run; drop max_updates"
            )
    mixer = plan.algorithms["mix"]
    if isinstance(mixer, Mixer):
        mixer.check_streams()


class SteeringController:
    """Runs the stages of a steering plan inside a training run.

    Args:
        plan: the built plan (configuration and algorithms).
        domains: domain id of each pool sample, ``(N,)``; ``None`` when the domains are
            streams (:mod:`datasteer.streams`), which a mix stage must then draw from.
        domain_names: names of the domain ids.
        global_batch: samples per optimizer step over all ranks and micro-batches.
        seed: seed of every steering draw.
        lag: steps between deciding and using an update (>= 1).
        log: the run record (``None``: no file).
        stream_steps: with streamed domains, the steps of the run (its ``max_steps``).
    """

    def __init__(
        self,
        plan: SteeringPlan,
        *,
        domains: np.ndarray | None,
        domain_names: Sequence[str],
        global_batch: int,
        seed: int,
        lag: int,
        log: RunLog | None = None,
        stream_steps: int | None = None,
    ) -> None:
        self.plan = plan
        streamed = domains is None
        self.domains = np.zeros(0, dtype=np.int64) if domains is None else np.asarray(domains, dtype=np.int64)
        self.domain_names = tuple(domain_names)
        self.log = log
        self._resumed_at: int | None = None
        self._served = np.zeros(len(self.domain_names), dtype=np.int64)
        plan.check_domains(self.domain_names)
        select = plan.config.stages.get("select")
        if not streamed and select is not None and select.stream_window is not None:
            raise ConfigError("select.stream_window: applies to streamed domains only (their candidate windows)")
        sampler: MixtureSampler | SelectionSampler | None = None
        if streamed:
            check_streamable(plan, stream_steps)
            sampler = MixtureSampler(None, len(self.domain_names), global_batch, seed, steps_per_epoch=stream_steps)
        elif "mix" in plan.algorithms:
            sizes = np.bincount(self.domains, minlength=len(self.domain_names))
            empty = [n for n, size in zip(self.domain_names, sizes, strict=True) if size == 0]
            if empty:
                raise ConfigError(f"dataset: domains {empty} have no training samples; a mixer needs every domain")
            sampler = MixtureSampler(self.domains, len(self.domain_names), global_batch, seed)
        elif "select" in plan.algorithms:
            sampler = SelectionSampler(len(self.domains), global_batch, seed)
        self.run = RunInfo(self.domains, self.domain_names, global_batch, seed, sampler, streamed=streamed)
        self.drivers: list[Driver[Any]] = [
            DRIVERS[p](plan.config.stages[p], plan.algorithms[p], self.run, lag) for p in plan.paradigms
        ]

    @property
    def sampler(self) -> MixtureSampler | SelectionSampler | None:
        """The index stream the Trainer serves (``None``: the Trainer's own sampler)."""
        return self.run.sampler

    @property
    def max_steps(self) -> int:
        return self.run.max_steps

    @property
    def stream_rows(self) -> int:
        """Streamed domains: rows of each stream to keep after they are read (a step's rows
        arrive shuffled; a selector's candidate windows are read ahead of their steps)."""
        windows = [d.stream_rows() for d in self.drivers if isinstance(d, SelectDriver)]
        return max([self.run.global_batch, *windows])

    @property
    def needs_sample_losses(self) -> bool:
        """Whether training batches need per-sample losses (for weights or for a stage that learns)."""
        return any(d.needs_sample_losses for d in self.drivers)

    @property
    def weights_samples(self) -> bool:
        """Whether the training loss is reweighted per sample."""
        return any(d.weights_loss for d in self.drivers)

    @property
    def reference_model(self) -> str | None:
        """Path of the reference model whose per-token losses a stage needs on every training
        batch, if any (a selector's reference losses are of pool samples, asked for when it selects)."""
        return next((path for d in self.drivers if (path := d.reference_model()) is not None), None)

    @property
    def embedding_layer(self) -> tuple[int, Any] | None:
        """``(layer, pooling)`` of the pooled hidden states a stage needs from the training forward."""
        return next((e for d in self.drivers if (e := d.embedding_layer()) is not None), None)

    def learned_proportions(self) -> dict[str, Any] | None:
        """What a stage learned over the run (DoReMi's averaged weights), for a later static run."""
        return next((learned for d in self.drivers if (learned := d.learned()) is not None), None)

    # -- training events ---------------------------------------------------------------
    def begin(self, max_steps: int, ops: Callable[[], ModelOperations] | None = None) -> list[dict[str, Any]]:
        """At train begin: set the initial plans and compute updates due before step 1."""
        self.run.max_steps = max_steps
        if self._resumed_at is not None:
            return []
        if self.log is not None:
            self.log.start_fresh()
        events = [self._record(d, payload) for d in self.drivers for payload in d.begin()]
        return events + self.step_end(0, ops)

    def step_end(self, step: int, ops: Callable[[], ModelOperations] | None = None) -> list[dict[str, Any]]:
        """After optimizer step ``step`` (0: train begin): every stage acts on what is due, in order."""
        return [self._record(d, payload) for d in self.drivers for payload in d.decide(step, ops)]

    def end(self, step: int) -> dict[str, Any]:
        """At train end: a closing record (``paradigm: end``) with what was served since the
        last record, so that the served mix of every window, the last one included, is on record."""
        return self._record(None, {"step": step})

    # -- per-batch hooks ---------------------------------------------------------------
    def observe(
        self,
        indices: torch.Tensor,
        losses: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        excess: torch.Tensor | None = None,
        reference_losses: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> TrainedBatch:
        """Note a trained micro-batch: its domains (reported with the next event) and, when
        given, its per-sample token-mean losses, labelled-token counts, summed excess losses
        over a reference model, the reference's token-mean losses and pooled hidden states.
        Returns the batch as the stages see it."""
        idx = indices.detach().cpu().numpy()
        batch = TrainedBatch(idx, self.run.domain_of(idx), losses, tokens, excess, reference_losses, embeddings)
        self._served += np.bincount(batch.domains, minlength=len(self.domain_names))
        for driver in self.drivers:
            driver.observe(batch)
        return batch

    def sample_weights(self, step: int, batch: TrainedBatch) -> torch.Tensor:
        """Loss weights of a micro-batch of step ``step``: the product of every weighting
        stage's weights (1 where none weights).

        A sample whose loss is not finite gets weight 0 (left out of the step's loss, so one
        sample cannot turn it NaN), unless no sample of the micro-batch has a finite loss:
        the loss then stays non-finite, for the run's divergence check.
        """
        assert batch.losses is not None
        weights = torch.ones_like(batch.losses)
        for driver in self.drivers:
            w = driver.loss_weights(step, batch)
            if w is not None:
                weights = weights * w.to(weights.device, weights.dtype)
        finite = torch.isfinite(batch.losses.detach())
        if bool(finite.any()):
            weights = torch.where(finite, weights, torch.zeros_like(weights))
        return weights

    # -- records -------------------------------------------------------------------------
    def _record(self, driver: Driver[Any] | None, payload: dict[str, Any]) -> dict[str, Any]:
        served = dist.all_reduce(torch.from_numpy(self._served.copy())).numpy()
        self._served[:] = 0
        record = dict(payload)
        full: dict[str, Any] = {"step": record.pop("step")}
        if driver is None:
            full["paradigm"] = "end"
        else:
            full.update(paradigm=driver.paradigm, algorithm=driver.stage.algorithm)
        full.update(record)
        full["served"] = dict(zip(self.domain_names, (int(c) for c in served), strict=True))
        full["seconds"] = full.pop("seconds", 0.0)
        if self.log is not None:
            self.log.write(full)
        logger.info("steering %s", full)
        return full

    # -- state ---------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        """Everything needed to continue exactly after optimizer step ``step``."""
        return {
            "version": STATE_VERSION,
            "step": step,
            "stages": {d.paradigm: {"algorithm": d.stage.algorithm, "state": d.state_dict()} for d in self.drivers},
            "sampler": self.sampler.state_dict(step) if self.sampler is not None else None,
            "served": torch.from_numpy(self._served.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the run continues with step ``state['step'] + 1``."""
        if state.get("version") == 1:  # one stage: paradigm, algorithm, algorithm_state
            stage = {"algorithm": state["algorithm"], "state": {"algorithm": state["algorithm_state"]}}
            state = {**state, "stages": {state["paradigm"]: stage}}
        elif state.get("version") != STATE_VERSION:
            raise SteeringStateError(f"unsupported steering state version {state.get('version')}")
        stages = state["stages"]
        theirs = " + ".join(f"{p}/{s['algorithm']}" for p, s in stages.items())
        ours = self.plan.config.describe()
        if theirs != ours:
            raise SteeringStateError(f"the checkpoint was steered by {theirs}, this run by {ours}")
        for driver in self.drivers:
            driver.load_state_dict(stages[driver.paradigm]["state"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        self._served = state["served"].numpy().astype(np.int64).copy()
        self._resumed_at = int(state["step"])
        if self.log is not None:
            self.log.truncate_after(self._resumed_at)
