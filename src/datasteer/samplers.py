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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from datasteer.errors import SteeringStateError
from datasteer.rng import torch_generator
from datasteer.streams import decode, encode

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


@dataclass
class _Position:
    """Where a mixture stream stands at the start of a step.

    ``drawn``: draws made from each domain's part of the selection in force (positions in
    its seeded order; from the whole domain when no selection is in force). ``stream``: with
    streamed domains, the first row of each stream not yet served or taken into a candidate
    window. ``selection``: the first step of the selection ``drawn`` counts in.
    """

    drawn: np.ndarray
    stream: np.ndarray
    selection: int

    def copy(self) -> _Position:
        return _Position(self.drawn.copy(), self.stream.copy(), self.selection)


class MixtureSampler(SteeringSampler):
    """Serves each step's batch as a mixture of domains in the proportions in force.

    A plan is a 1-D array of K proportions. With a selector composed under the mixer, a
    second track of plans holds selections (:meth:`add_selection`): a domain's share of a
    step is then drawn from that domain's selected samples (in a seeded order, reshuffled
    each time they are used up), or from the whole domain when the selection in force has
    none of it (e.g. before the first selection). The per-domain positions restart when a
    new selection comes into force.

    Streamed domains (``domains=None``, :mod:`datasteer.streams`): an index names a domain
    and a position in its stream, and a domain's share of a step is its stream's next rows.
    A selection then chooses from a **candidate window** of each stream: the rows from the
    stream position at the selection's first step (:meth:`stream_position`) to its
    ``window_end``. The selected rows are served (in a seeded order, cycling) while the
    selection is in force, the other rows of the window are skipped, and when it comes into
    force each stream continues after its window. A domain the selection has no rows of
    takes its stream's next rows, as without a selection.
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
        self._windows: list[tuple[int, np.ndarray | None]] = [(1, None)]  # streamed: each selection's window ends
        zeros = np.zeros(num_domains, dtype=np.int64)
        self._pos = _Position(zeros.copy(), zeros.copy(), 1)  # at the start of step _pos_step
        self._pos_step = 1
        self._snapshots: OrderedDict[int, _Position] = OrderedDict({1: self._pos.copy()})
        self._selected: tuple[int, list[np.ndarray]] | None = None  # cache: (first step, members)

    def add_plan(self, first_step: int, plan: Any) -> None:
        p = np.asarray(plan, dtype=np.float64)
        if p.shape != (self.num_domains,):
            raise ValueError(f"expected {self.num_domains} proportions, got shape {p.shape}")
        empty = [d for d in range(self.num_domains) if p[d] > 0 and len(self.members[d]) == 0]
        if empty and not self.streamed:
            raise ValueError(f"domains {empty} have no samples but positive proportions")
        super().add_plan(first_step, p)

    def add_selection(self, first_step: int, indices: np.ndarray, window_end: np.ndarray | None = None) -> None:
        """Draw each domain's share from the selected pool indices from ``first_step`` on.

        With streamed domains, ``indices`` are stream indices of the candidate windows, and
        ``window_end`` (required) is the stream position after each domain's window: the
        stream continues there when the selection comes into force.
        """
        if self.streamed:
            if window_end is None:
                raise SteeringStateError("a selection of streamed domains needs the end of its candidate windows")
            end = np.asarray(window_end, dtype=np.int64)
            start = self.stream_position(first_step)
            if end.shape != (self.num_domains,) or bool((end < start).any()):
                raise ValueError(f"window ends {end.tolist()} do not follow the stream positions {start.tolist()}")
            chosen = _checked_selection(indices, np.iinfo(np.int64).max)
            domains, positions = decode(chosen, self.num_domains)
            if bool((positions < start[domains]).any() or (positions >= end[domains]).any()):
                raise ValueError("selected stream rows must lie in their domain's candidate window")
            self._selections = self._registered(self._selections, first_step, chosen)
            self._windows = self._registered(self._windows, first_step, end)
            return
        if window_end is not None:
            raise ValueError("window_end applies to streamed domains only")
        self._selections = self._registered(self._selections, first_step, _checked_selection(indices, self.pool_size))

    def selection_at(self, step: int) -> np.ndarray | None:
        """The selected pool indices in force at ``step`` (``None``: every domain drawn whole)."""
        chosen: np.ndarray | None = self._in_force(self._selections, step)[1]
        return chosen

    def _domain_ids(self, indices: np.ndarray) -> np.ndarray:
        return decode(indices, self.num_domains)[0] if self.streamed else self.domain_of[indices]

    def _domain_members(self, first: int, chosen: np.ndarray | None) -> list[np.ndarray]:
        if chosen is None:
            return self.members
        if self._selected is None or self._selected[0] != first:
            ids = self._domain_ids(chosen)
            self._selected = (first, [chosen[ids == d] for d in range(self.num_domains)])
        return self._selected[1]

    def domain_counts(self, step: int) -> np.ndarray:
        """How many samples of each domain step ``step`` serves (a pure function of the plan)."""
        _, p = self.plan_at(step)
        u = float(torch.rand((), generator=torch_generator(self.seed, "mix-counts", step), dtype=torch.float64))
        return systematic_counts(p, self.global_batch, u)

    # -- the walk through the stream -----------------------------------------------------
    def _position_at(self, step: int) -> _Position:
        """The position at the start of ``step``, walked from the latest known one at or before it."""
        if step == self._pos_step:
            return self._pos.copy()
        known = [s for s in self._snapshots if s <= step]
        if not known:
            raise SteeringStateError(f"the mixture stream is at step {self._pos_step}, asked for {step}")
        at = max(known)
        pos = self._snapshots[at].copy()
        for s in range(at, step):
            self._serve(s, pos)
        return pos

    def _serve(self, step: int, pos: _Position) -> list[np.ndarray]:
        """Step ``step``'s indices, domain by domain (unshuffled); advances ``pos`` past it."""
        sel_first, chosen = self._in_force(self._selections, step)
        if sel_first != pos.selection:
            pos.drawn[:] = 0
            pos.selection = sel_first
            end = self._in_force(self._windows, step)[1]
            if self.streamed and end is not None:  # the stream continues after the candidate window
                pos.stream = end.copy()
        selected = self._domain_members(sel_first, chosen)
        counts = self.domain_counts(step)
        parts = []
        for d in np.flatnonzero(counts):
            members = selected[d]
            if self.streamed and (chosen is None or not len(members)):  # the stream's next rows, in its order
                positions = pos.stream[d] + np.arange(counts[d], dtype=np.int64)
                pos.stream[d] += counts[d]
                parts.append(encode(np.full_like(positions, d), positions, self.num_domains))
                continue
            positions = pos.drawn[d] + np.arange(counts[d], dtype=np.int64)
            pos.drawn[d] += counts[d]
            key: tuple[Any, ...] = ("domain", int(d))
            if chosen is not None and len(members):
                key = ("selected", sel_first, int(d))
            elif chosen is not None:  # nothing of d selected: the whole domain, in a fresh order
                members, key = self.members[d], ("domain", int(d), sel_first)
            parts.append(members[self._perms.lookup(key, len(members), positions)])
        return parts

    def stream_position(self, step: int) -> np.ndarray:
        """Streamed domains: each stream's next row at the start of ``step``, before a
        selection that starts at ``step`` (where its candidate windows start)."""
        if not self.streamed:
            raise SteeringStateError("stream positions exist for streamed domains only")
        pos = self._position_at(step)
        return pos.stream

    def _draw(self, step: int) -> np.ndarray:
        if step != self._pos_step:
            if step not in self._snapshots:
                raise SteeringStateError(f"the mixture stream is at step {self._pos_step}, asked for {step}")
            self._pos, self._pos_step = self._snapshots[step].copy(), step
        parts = self._serve(step, self._pos)
        order = torch.randperm(self.global_batch, generator=torch_generator(self.seed, "mix-order", step)).numpy()
        self._pos_step = step + 1
        self._snapshots[step + 1] = self._pos.copy()
        while len(self._snapshots) > _SNAPSHOTS:
            self._snapshots.popitem(last=False)
        result: np.ndarray = np.concatenate(parts)[order]
        return result

    def state_dict(self, step: int) -> dict[str, Any]:
        state = super().state_dict(step)
        pos = self._position_at(step + 1)
        state["cursor"] = torch.from_numpy(pos.drawn.copy())
        state["selections"] = self._kept(self._selections, step)
        state["cursor_selection"] = pos.selection
        if self.streamed:
            state["stream_positions"] = torch.from_numpy(pos.stream.copy())
            state["windows"] = self._kept(self._windows, step)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._selections = [(int(s), _from_tensor(c)) for s, c in state.get("selections", [(1, None)])]
        self._windows = [(int(s), _from_tensor(c)) for s, c in state.get("windows", [(1, None)])]
        drawn = np.asarray(state["cursor"].numpy(), dtype=np.int64).copy()
        stream = state.get("stream_positions")
        if self.streamed and stream is None:  # saved before selections could be streamed: cursor held the positions
            stream, drawn = drawn.copy(), np.zeros_like(drawn)
        else:
            stream = np.zeros_like(drawn) if stream is None else np.asarray(stream.numpy(), dtype=np.int64).copy()
        selection = int(state.get("cursor_selection", self._selections[0][0]))
        self._pos, self._pos_step = _Position(drawn, stream, selection), int(state["step"]) + 1
        self._selected = None
        self._snapshots = OrderedDict({self._pos_step: self._pos.copy()})
