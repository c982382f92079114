"""The select driver: pool indices for the steps until the next update.

Alone, the selector chooses from the whole pool: ``num_samples`` = global batch x the
steps the update shapes. Under a mixer (composition), it chooses **within each domain**:
for every domain d whose share of those steps is positive, the selector sees only d's
samples (renumbered ``0..n_d - 1``, with model operations bound to them) and is asked for
``q_d`` = the number of domain-d samples the mixture serves in those steps under the
proportions known when the selection is made (the sum of each step's systematic counts).
The mixture then draws each domain's share of a step from its selected samples. Stateful
selectors keep one state per domain (a copy of the built algorithm per domain).

With streamed domains (:mod:`datasteer.streams`) a domain's pool is a **candidate window**:
the next ``ceil(q_d x ratio)`` rows of its stream from where the stream stands at the
update's first step (``ratio``: the stage's ``stream_window``, else the selector's own).
The selector keeps ``q_d`` of them, the sampler serves those while the selection is in
force, and the stream continues after the window; the other rows are skipped. Each window
is a new pool, so each selector forgets what it tied to the previous one
(:meth:`~datasteer.selectors.base.Selector.reset_pool`).

A selector that finds no finite score to select by raises
:class:`~datasteer.errors.NonFiniteInputError`; the selection in force then stands (for
that domain, under a mixer; with streams the domain takes its window's rows in stream
order instead), with a warning and ``kept: true`` in the record.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from typing import Any

import numpy as np
import torch

from datasteer import dist
from datasteer.drivers.base import Driver, OpsFactory
from datasteer.errors import NonFiniteInputError, SteeringStateError
from datasteer.ops.protocol import ModelOperations
from datasteer.rng import torch_generator
from datasteer.samplers import MixtureSampler
from datasteer.selectors.base import SelectContext, Selector
from datasteer.streams import encode

logger = logging.getLogger(__name__)


def digest(indices: np.ndarray) -> str:
    """Short stable fingerprint of an index array (order-sensitive)."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


class SelectDriver(Driver[Selector]):
    """Runs a :class:`~datasteer.selectors.base.Selector` (see the module docstring)."""

    paradigm = "select"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.within_domains = isinstance(self.run.sampler, MixtureSampler)
        self.members = [np.flatnonzero(self.run.domains == d) for d in range(self.run.num_domains)]
        # One selector per domain under a mixer (their states differ); the built one serves domain 0.
        count = self.run.num_domains if self.within_domains else 1
        self.selectors = [self.algorithm, *(copy.deepcopy(self.algorithm) for _ in range(count - 1))]
        self.window_ratio = self.stage.stream_window or self.algorithm.window_ratio()
        self._ran: list[Selector] = []  # the selectors that ran in the current update
        self._kept = False  # whether a selection in force was kept in the current update

    def decide(self, step: int, ops: OpsFactory) -> list[dict[str, Any]]:
        return [self._update(u, step, ops) for u in self.schedule.updates_decided_at(step, self.run.max_steps)]

    def _update(self, update: int, step: int, ops: OpsFactory) -> dict[str, Any]:
        first = self.schedule.first_step(update)
        last = self.schedule.last_step(update, self.run.max_steps)
        model_ops = self.model_ops(self.algorithm.needs_model, ops)
        started = time.perf_counter()
        payload: dict[str, Any] = {}
        self._ran = []
        self._kept = False
        window_end = None
        if self.within_domains:
            chosen, quotas, windows = self._select_within_domains(update, step, first, last, model_ops)
            payload["quotas"] = dict(zip(self.run.domain_names, (int(q) for q in quotas), strict=True))
            if windows is not None:  # streamed: each domain's candidate window
                payload["window_start"] = dict(zip(self.run.domain_names, map(int, windows[0]), strict=True))
                payload["window_rows"] = dict(
                    zip(self.run.domain_names, map(int, windows[1] - windows[0]), strict=True)
                )
                window_end = windows[1]
        else:
            pool = self.run.domains
            ctx = self._context(
                update,
                step,
                first,
                last,
                len(pool),
                self.run.global_batch * (last - first + 1),
                torch.from_numpy(pool),
                model_ops,
                torch_generator(self.run.seed, "select", update),
            )
            picked = self._run(self.algorithm, ctx, len(pool))
            chosen = picked if picked is not None else self._in_force(first)
        chosen = dist.broadcast_object(chosen)
        assert self.run.sampler is not None
        if chosen is not None and isinstance(self.run.sampler, MixtureSampler):
            self.run.sampler.add_selection(first, chosen, window_end)
        elif chosen is not None:
            self.run.sampler.add_selection(first, chosen)
        elif self.run.streamed:  # nothing to select by: the streams continue in their order
            chosen = np.zeros(0, dtype=np.int64)
        else:  # nothing to select by, and no selection yet: the whole pool stays in force
            chosen = np.arange(len(self.run.domains))
        counts = np.bincount(self.run.domain_of(chosen), minlength=self.run.num_domains)
        reports: dict[str, int | float] = {}
        for selector in self._ran:  # selectors that did not run this update would repeat old numbers
            for key, value in selector.report().items():
                reports[key] = reports.get(key, 0) + value
        record = {
            "step": step,
            "update": update,
            "first_step": first,
            "last_step": last,
            "selected": len(chosen),
            "unique": len(np.unique(chosen)),
            "digest": digest(chosen),
            "domain_counts": dict(zip(self.run.domain_names, (int(c) for c in counts), strict=True)),
            **payload,
            **reports,
            **({"kept": True} if self._kept else {}),
            "seconds": round(time.perf_counter() - started, 6),
        }
        return record

    def _run(self, selector: Selector, ctx: SelectContext, pool_size: int) -> np.ndarray | None:
        """The selector's checked indices, or ``None`` when it had no finite score to select by."""
        self._ran.append(selector)
        try:
            return self._check(selector.select(ctx), pool_size)
        except NonFiniteInputError as err:
            where = f" (domain {ctx.domain_names[int(ctx.domains[0])]})" if self.within_domains else ""
            logger.warning("%s%s: %s; the selection in force is kept", self.stage.algorithm, where, err)
            self._kept = True
            return None

    def _in_force(self, first: int) -> np.ndarray | None:
        """The selection in force at step ``first`` before this update (``None``: the whole pool)."""
        sampler = self.run.sampler
        if isinstance(sampler, MixtureSampler):
            return sampler.selection_at(first)
        assert sampler is not None
        plan: np.ndarray | None = sampler.plan_at(first)[1]
        return plan

    def _select_within_domains(
        self, update: int, step: int, first: int, last: int, ops: ModelOperations
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
        """(chosen pool indices or None, each domain's quota, and with streams each domain's
        candidate window as ``[[first rows], [ends]]``, shape (2, K))."""
        sampler = self.run.sampler
        assert isinstance(sampler, MixtureSampler)
        quotas = sum((sampler.domain_counts(s) for s in range(first, last + 1)), np.zeros(self.run.num_domains, int))
        previous = self._in_force(first)
        pools, windows = self.members, None
        if self.run.streamed:
            start = sampler.stream_position(first)
            rows = np.array([math.ceil(round(q * self.window_ratio, 9)) if q else 0 for q in quotas], dtype=np.int64)
            windows = np.stack([start, start + rows])
            pools = [encode(np.full(n, d), start[d] + np.arange(n), self.run.num_domains) for d, n in enumerate(rows)]
        parts = []
        for d, (members, selector) in enumerate(zip(pools, self.selectors, strict=True)):
            if quotas[d] == 0 or len(members) == 0:
                continue
            if self.run.streamed:
                selector.reset_pool()
            domain_ops = ops.subset(torch.from_numpy(members)) if selector.needs_model else ops
            ctx = self._context(
                update,
                step,
                first,
                last,
                len(members),
                int(quotas[d]),
                torch.full((len(members),), d, dtype=torch.long),
                domain_ops,
                torch_generator(self.run.seed, "select", update, d),
            )
            picked = self._run(selector, ctx, len(members))
            if picked is not None:
                parts.append(members[picked])
            elif windows is not None:  # streams: the window's rows stay in the stream, served in order
                windows[1, d] = windows[0, d]
            elif previous is not None:  # domain d's part of the selection in force
                parts.append(previous[self.run.domains[previous] == d])
        # No part at all: nothing selected of any domain, so every domain is drawn whole.
        chosen = np.concatenate(parts) if parts and sum(len(p) for p in parts) else None
        return chosen, quotas, windows

    def stream_rows(self) -> int:
        """Rows of one stream to keep after they are read, with candidate windows: every
        window decided and not yet trained (the one in training, and those read ``lag``
        steps ahead), each at most ``ratio`` x an update's rows, plus a step's rows (served
        shuffled). A domain without a window takes fewer rows in stream order meanwhile."""
        window = math.ceil(round(self.run.global_batch * self.schedule.update_every * self.window_ratio, 9))
        in_flight = 2 + self.schedule.lag // self.schedule.update_every
        return in_flight * window + self.run.global_batch

    def _context(
        self,
        update: int,
        step: int,
        first: int,
        last: int,
        pool_size: int,
        num_samples: int,
        domains: torch.Tensor,
        ops: ModelOperations,
        generator: torch.Generator,
    ) -> SelectContext:
        return SelectContext(
            step=step,
            first_step=first,
            last_step=last,
            max_steps=self.run.max_steps,
            update=update,
            total_updates=self.schedule.total_updates(self.run.max_steps),
            num_samples=num_samples,
            pool_size=pool_size,
            domains=domains,
            domain_names=self.run.domain_names,
            generator=generator,
            ops=ops,
        )

    def _check(self, chosen: torch.Tensor, pool_size: int) -> np.ndarray:
        arr = torch.as_tensor(chosen).detach().cpu().numpy()
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise SteeringStateError(f"{self.stage.algorithm} must return a non-empty 1-D integer tensor")
        if arr.min() < 0 or arr.max() >= pool_size:
            raise SteeringStateError(f"{self.stage.algorithm} returned indices outside [0, {pool_size})")
        return arr.astype(np.int64)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.within_domains:
            return super().state_dict()
        return {"per_domain": [s.state_dict() for s in self.selectors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.within_domains:
            super().load_state_dict(state)
            return
        if "per_domain" not in state or len(state["per_domain"]) != len(self.selectors):
            raise SteeringStateError("the checkpoint's selector state is not one per domain of this mixed run")
        for selector, part in zip(self.selectors, state["per_domain"], strict=True):
            selector.load_state_dict(part)
