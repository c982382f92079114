"""Samplers that serve the steering plans as the Trainer's global index stream.

The stream is a sequence of optimizer steps; step ``s`` (1-based) receives ``B`` indices,
``B = per-device batch x gradient accumulation x world size``. The data loader's batch
sampler (and, with several ranks, accelerate's shard of it) splits each step's ``B``
indices into micro-batches: rank ``r`` takes micro-batches ``r, r + W, ...``. Every rank
computes the same stream, because it is a pure function of (seed, step, plans in force):

* :class:`SelectionSampler`: before the first selection, a seeded shuffle of the whole
  pool; after an update, the selected indices in a seeded shuffled order, cycling
  (reshuffled each cycle) if the steps need more than were selected.
* :class:`MixtureSampler`: each step's domain counts come from the proportions in force by
  systematic sampling (each count is the floor or the ceiling of ``B * p_d``, with
  expectation exactly ``B * p_d``); each domain is drawn **without replacement** in a
  seeded order until it is exhausted, then reshuffled (a new seeded permutation) and
  drawn again; the step's indices are shuffled so that micro-batches mix domains.

A plan registered for step ``s`` must arrive before the data loader draws step ``s``; the
controller registers it ``lag`` steps ahead and the sampler raises
:class:`SteeringStateError` if it arrives late, so a stream is never silently different.

Resume: the state saved at step ``t`` holds the plans in force from step ``t + 1`` (and
the mixture's per-domain positions). The Trainer then skips the micro-batches of steps
already trained in the current epoch; the sampler serves placeholder index 0 for those
steps (they are drawn and discarded, never trained) and the exact stream from ``t + 1``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from datasteer.errors import SteeringStateError
from datasteer.rng import torch_generator
from datasteer.streams import encode

#: How many recent per-step stream positions the mixture sampler keeps (covers prefetching).
_SNAPSHOTS = 256


class _Permutations:
    """Seeded permutations of ``range(n)`` by (key, cycle), with a small cache."""

    def __init__(self, seed: int, size: int = 4) -> None:
        self.seed = seed
        self._cache: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._size = size

    def lookup(self, key: tuple[Any, ...], n: int, positions: np.ndarray) -> np.ndarray:
        """``perm_c[pos % n]`` for each position, ``c = pos // n`` its cycle."""
        cycles = positions // n
        out = np.empty_like(positions)
        for cycle in np.unique(cycles):
            cache_key = (*key, n, int(cycle))
            perm = self._cache.get(cache_key)
            if perm is None:
                perm = torch.randperm(n, generator=torch_generator(self.seed, *cache_key)).numpy()
                self._cache[cache_key] = perm
                while len(self._cache) > self._size:
                    self._cache.popitem(last=False)
            mask = cycles == cycle
            out[mask] = perm[positions[mask] % n]
        return out


class SteeringSampler(Sampler[int]):
    """Base: a step-keyed index stream with plans registered ahead of use."""

    def __init__(self, pool_size: int, global_batch: int, seed: int, steps_per_epoch: int | None = None) -> None:
        if pool_size < 1:
            raise ValueError("the training pool is empty")
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        self.pool_size = pool_size
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch or max(1, pool_size // global_batch)
        self.max_drawn_step = 0
        self._plans: list[tuple[int, Any]] = []
        self._floor = 0
        self._next_epoch = 0
        self._perms = _Permutations(seed)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.global_batch

    def set_epoch(self, epoch: int) -> None:
        """Called by the data loader at each epoch; the stream continues at that epoch."""
        self._next_epoch = epoch

    def __iter__(self) -> Iterator[int]:
        epoch = self._next_epoch
        self._next_epoch += 1
        first = epoch * self.steps_per_epoch + 1
        for step in range(first, first + self.steps_per_epoch):
            self.max_drawn_step = max(self.max_drawn_step, step)
            yield from self.indices_for_step(step).tolist()

    # -- plans -----------------------------------------------------------------------
    # A track is a list of (first step, plan), ordered by step; the plan in force at a step
    # is the last one that starts at or before it. The mixture keeps a second track.
    def _registered(self, track: list[tuple[int, Any]], first_step: int, plan: Any) -> list[tuple[int, Any]]:
        """``track`` with ``plan`` in force from ``first_step`` on (later plans dropped)."""
        if first_step <= self.max_drawn_step:
            raise SteeringStateError(
                f"a steering update for step {first_step} arrived after the data loader drew step "
                f"{self.max_drawn_step}; raise datasteer.lag (data loader workers prefetch batches ahead)"
            )
        return [*((s, p) for s, p in track if s < first_step), (first_step, plan)]

    @staticmethod
    def _in_force(track: list[tuple[int, Any]], step: int) -> tuple[int, Any]:
        current = None
        for first, plan in track:
            if first <= step:
                current = (first, plan)
        if current is None:
            raise SteeringStateError(f"no steering plan covers step {step}")
        return current

    def _kept(self, track: list[tuple[int, Any]], step: int) -> list[tuple[int, Any]]:
        """The plans of ``track`` a resume after ``step`` needs, as tensors (for the state)."""
        first, plan = self._in_force(track, step + 1)
        return [(s, _to_tensor(p)) for s, p in [(first, plan), *((s, p) for s, p in track if s > first)]]

    def add_plan(self, first_step: int, plan: Any) -> None:
        """Serve ``plan`` from ``first_step`` on (until a later plan takes over)."""
        self._plans = self._registered(self._plans, first_step, plan)

    def plan_at(self, step: int) -> tuple[int, Any]:
        """(first step, plan) in force at ``step``."""
        return self._in_force(self._plans, step)

    def indices_for_step(self, step: int) -> np.ndarray:
        """The ``global_batch`` pool indices of optimizer step ``step``."""
        if step <= self._floor:
            # Already trained before a resume: the Trainer skips these batches unseen.
            return np.zeros(self.global_batch, dtype=np.int64)
        return self._draw(step)

    def _draw(self, step: int) -> np.ndarray:
        raise NotImplementedError

    # -- state -----------------------------------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        """State to continue with step ``step + 1`` after a resume at ``step``."""
        return {
            "step": step,
            "plans": self._kept(self._plans, step),
            "pool_size": self.pool_size,
            "global_batch": self.global_batch,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (the first drawn step is ``step + 1``)."""
        for key in ("pool_size", "global_batch", "seed"):
            if state[key] != getattr(self, key):
                raise SteeringStateError(
                    f"checkpoint steering state has {key}={state[key]}, this run has {getattr(self, key)}; "
                    "resume with the same data, batch size and seed"
                )
        step = int(state["step"])
        self._plans = [(int(s), _from_tensor(p)) for s, p in state["plans"]]
        self._floor = step
        self.max_drawn_step = step
        self._next_epoch = step // self.steps_per_epoch


def _to_tensor(plan: Any) -> Any:
    return torch.from_numpy(np.asarray(plan)) if isinstance(plan, np.ndarray) else plan


def _from_tensor(plan: Any) -> Any:
    return plan.numpy() if isinstance(plan, torch.Tensor) else plan


def _checked_selection(indices: Any, pool_size: int) -> np.ndarray:
    """``indices`` as a non-empty 1-D int64 array of pool indices; ValueError otherwise."""
    chosen = np.asarray(indices, dtype=np.int64)
    if chosen.ndim != 1 or chosen.size == 0:
        raise ValueError("a selection must be a non-empty 1-D array of pool indices")
    if chosen.min() < 0 or chosen.max() >= pool_size:
        raise ValueError(f"selected indices must lie in [0, {pool_size})")
    return chosen


class SelectionSampler(SteeringSampler):
    """Serves the current selection; before the first one, a shuffle of the whole pool.

    A plan is a 1-D array of pool indices (or ``None`` for the whole pool).
    """

    def __init__(self, pool_size: int, global_batch: int, seed: int, steps_per_epoch: int | None = None) -> None:
        super().__init__(pool_size, global_batch, seed, steps_per_epoch)
        self._plans = [(1, None)]

    def _draw(self, step: int) -> np.ndarray:
        first, plan = self.plan_at(step)
        offsets = np.arange(self.global_batch, dtype=np.int64)
        if plan is None:
            positions = (step - 1) * self.global_batch + offsets
            return self._perms.lookup(("pool",), self.pool_size, positions)
        positions = (step - first) * self.global_batch + offsets
        return np.asarray(plan)[self._perms.lookup(("selection", first), len(plan), positions)]

    def add_plan(self, first_step: int, plan: Any) -> None:
        super().add_plan(first_step, None if plan is None else _checked_selection(plan, self.pool_size))

    def add_selection(self, first_step: int, indices: np.ndarray) -> None:
        """Serve the selected pool indices from ``first_step`` on."""
        self.add_plan(first_step, indices)


def systematic_counts(proportions: np.ndarray, total: int, u: float) -> np.ndarray:
    """Integer counts summing to ``total`` with ``E[count_d] = total * p_d`` exactly.

    Systematic sampling: the points ``(k + u) / total`` for k = 0..total-1, with one
    uniform offset ``u`` in [0, 1), fall into the intervals of the cumulative proportions.
    Each count is ``floor`` or ``ceil`` of ``total * p_d``.
    """
    edges = np.concatenate([[0.0], np.cumsum(proportions, dtype=np.float64)]) * total
    edges[-1] = total  # guard float drift
    # How many points k + u lie below each edge: every k < floor(edge), and k = floor(edge)
    # when u is below the edge's fraction (ceil(edge - u) says the same, but the subtraction
    # can round: 3 - (1 - 2**-52) is 2.0 in float64, and the step would be one short).
    whole = np.floor(edges)
    below = whole.astype(np.int64) + (edges - whole > u)
    return np.diff(below)


class MixtureSampler(SteeringSampler):
    """Serves each step's batch as a mixture of domains in the proportions in force.

    A plan is a 1-D array of K proportions. With a selector composed under the mixer, a
    second track of plans holds selections (:meth:`add_selection`): a domain's share of a
    step is then drawn from that domain's selected samples (in a seeded order, reshuffled
    each time they are used up), or from the whole domain when the selection in force has
    none of it (e.g. before the first selection). The per-domain positions restart when a
    new selection comes into force.
    """

    def __init__(
        self,
        domains: np.ndarray | None,
        num_domains: int,
        global_batch: int,
        seed: int,
        steps_per_epoch: int | None = None,
    ) -> None:
        # domains None: streamed domains (datasteer.streams), whose sizes are unknown; an
        # index then names a domain and a position in its stream, and positions are not permuted.
        self.streamed = domains is None
        if domains is None:
            if steps_per_epoch is None:
                raise ValueError("a mixture of streamed domains needs steps_per_epoch (the run's max_steps)")
            domains = np.zeros(0, dtype=np.int64)
        domains = np.asarray(domains, dtype=np.int64)
        super().__init__(max(len(domains), 1) if self.streamed else len(domains), global_batch, seed, steps_per_epoch)
        self.num_domains = num_domains
        self.domain_of = domains
        self.members = [np.flatnonzero(domains == d) for d in range(num_domains)]
        self._selections: list[tuple[int, np.ndarray | None]] = [(1, None)]
        self._cursor = np.zeros(num_domains, dtype=np.int64)  # draws made from each domain
        self._cursor_step = 1
        self._cursor_selection = 1  # first step of the selection the positions count in
        self._snapshots: OrderedDict[int, tuple[np.ndarray, int]] = OrderedDict({1: (self._cursor.copy(), 1)})
        self._selected: tuple[int, list[np.ndarray]] | None = None  # cache: (first step, members)

    def add_plan(self, first_step: int, plan: Any) -> None:
        p = np.asarray(plan, dtype=np.float64)
        if p.shape != (self.num_domains,):
            raise ValueError(f"expected {self.num_domains} proportions, got shape {p.shape}")
        empty = [d for d in range(self.num_domains) if p[d] > 0 and len(self.members[d]) == 0]
        if empty and not self.streamed:
            raise ValueError(f"domains {empty} have no samples but positive proportions")
        super().add_plan(first_step, p)

    def add_selection(self, first_step: int, indices: np.ndarray) -> None:
        """Draw each domain's share from the selected pool indices from ``first_step`` on."""
        if self.streamed:
            raise SteeringStateError("a selection cannot be composed under a mixture of streamed domains")
        self._selections = self._registered(self._selections, first_step, _checked_selection(indices, self.pool_size))

    def selection_at(self, step: int) -> np.ndarray | None:
        """The selected pool indices in force at ``step`` (``None``: every domain drawn whole)."""
        chosen: np.ndarray | None = self._in_force(self._selections, step)[1]
        return chosen

    def _domain_members(self, first: int, chosen: np.ndarray | None) -> list[np.ndarray]:
        if chosen is None:
            return self.members
        if self._selected is None or self._selected[0] != first:
            ids = self.domain_of[chosen]
            self._selected = (first, [chosen[ids == d] for d in range(self.num_domains)])
        return self._selected[1]

    def domain_counts(self, step: int) -> np.ndarray:
        """How many samples of each domain step ``step`` serves (a pure function of the plan)."""
        _, p = self.plan_at(step)
        u = float(torch.rand((), generator=torch_generator(self.seed, "mix-counts", step), dtype=torch.float64))
        return systematic_counts(p, self.global_batch, u)

    def _draw(self, step: int) -> np.ndarray:
        if step != self._cursor_step:
            if step not in self._snapshots:
                raise SteeringStateError(f"the mixture stream is at step {self._cursor_step}, asked for {step}")
            cursor, selection = self._snapshots[step]
            self._cursor, self._cursor_selection = cursor.copy(), selection
            self._cursor_step = step
        sel_first, chosen = self._in_force(self._selections, step)
        if sel_first != self._cursor_selection:
            self._cursor[:] = 0
            self._cursor_selection = sel_first
        selected = self._domain_members(sel_first, chosen)
        counts = self.domain_counts(step)
        parts = []
        for d in np.flatnonzero(counts):
            positions = self._cursor[d] + np.arange(counts[d], dtype=np.int64)
            self._cursor[d] += counts[d]
            if self.streamed:  # the next rows of the domain's stream, in its order
                parts.append(encode(np.full_like(positions, d), positions, self.num_domains))
                continue
            members = selected[d]
            key: tuple[Any, ...] = ("domain", int(d))
            if chosen is not None and len(members):
                key = ("selected", sel_first, int(d))
            elif chosen is not None:  # nothing of d selected: the whole domain, in a fresh order
                members, key = self.members[d], ("domain", int(d), sel_first)
            parts.append(members[self._perms.lookup(key, len(members), positions)])
        order = torch.randperm(self.global_batch, generator=torch_generator(self.seed, "mix-order", step)).numpy()
        self._cursor_step = step + 1
        self._snapshots[step + 1] = (self._cursor.copy(), self._cursor_selection)
        while len(self._snapshots) > _SNAPSHOTS:
            self._snapshots.popitem(last=False)
        result: np.ndarray = np.concatenate(parts)[order]
        return result

    def state_dict(self, step: int) -> dict[str, Any]:
        state = super().state_dict(step)
        if step + 1 not in self._snapshots:
            raise SteeringStateError(f"no mixture stream position recorded for step {step + 1}")
        cursor, selection = self._snapshots[step + 1]
        state["cursor"] = torch.from_numpy(cursor.copy())
        state["selections"] = self._kept(self._selections, step)
        state["cursor_selection"] = selection
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._cursor = np.asarray(state["cursor"].numpy(), dtype=np.int64).copy()
        self._cursor_step = int(state["step"]) + 1
        self._selections = [(int(s), _from_tensor(c)) for s, c in state.get("selections", [(1, None)])]
        self._cursor_selection = int(state.get("cursor_selection", self._selections[0][0]))
        self._selected = None
        self._snapshots = OrderedDict({self._cursor_step: (self._cursor.copy(), self._cursor_selection)})
