"""Tests of datasteer.controller driven directly (no Trainer), with the run log and state round trips."""

from __future__ import annotations

import dataclasses
import io
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datasteer.config import doc, load_steering
from datasteer.controller import STATE_VERSION, Schedule, SteeringController, digest
from datasteer.drivers import TrainedBatch
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.mixers.base import MixContext, Mixer
from datasteer.mixers.random import RandomMixer, RandomMixParams
from datasteer.plan import build_plan
from datasteer.registry import MIXERS, SELECTORS, WEIGHTERS
from datasteer.rng import torch_generator
from datasteer.runlog import RunLog, read_records
from datasteer.samplers import MixtureSampler, SteeringSampler
from datasteer.selectors.base import SelectContext, Selector
from datasteer.selectors.random import RandomSelector, RandomSelectParams
from datasteer.weighters.base import WeightContext, Weighter
from tests.factories import mix_context, select_context, without_seconds

NAMES = ("a", "b", "c")
DOMAINS = np.array([0] * 10 + [1] * 6 + [2] * 8)  # 24 samples
B = 4  # global batch: 6 steps per epoch
SEED = 11


# -- Schedule -------------------------------------------------------------------------------------


def decisions(schedule: Schedule, max_steps: int) -> dict[int, list[int]]:
    """step -> updates decided after it, for every step that decides something."""
    out = {s: schedule.updates_decided_at(s, max_steps) for s in range(max_steps + 1)}
    return {s: u for s, u in out.items() if u}


def test_schedule_steps() -> None:
    s = Schedule(warmup_steps=2, update_every=3, max_updates=None, lag=1)
    assert [s.first_step(u) for u in range(4)] == [3, 6, 9, 12]
    assert [s.last_step(u, 10) for u in range(3)] == [5, 8, 10]  # the last one is cut at max_steps
    assert [s.decided_at(u) for u in range(3)] == [1, 4, 7]
    assert decisions(s, 10) == {1: [0], 4: [1], 7: [2]}


def test_schedule_max_updates_keeps_the_last_in_force() -> None:
    s = Schedule(warmup_steps=2, update_every=3, max_updates=2, lag=1)
    assert s.last_step(0, 20) == 5
    assert s.last_step(1, 20) == 20
    assert decisions(s, 20) == {1: [0], 4: [1]}


def test_schedule_lag() -> None:
    s = Schedule(warmup_steps=4, update_every=3, max_updates=None, lag=2)
    assert [s.decided_at(u) for u in range(3)] == [2, 5, 8]
    assert decisions(s, 12) == {2: [0], 5: [1], 8: [2]}


def test_schedule_without_warmup_decides_at_train_begin() -> None:
    s = Schedule(warmup_steps=0, update_every=4, max_updates=None, lag=1)
    assert [s.first_step(u) for u in range(3)] == [1, 5, 9]
    assert decisions(s, 10) == {0: [0], 3: [1], 7: [2]}


def test_schedule_every_step_with_a_long_lag() -> None:
    # update u shapes step u + 1 and is decided after step u + 1 - 1 - 3 = u - 3 (train begin if <= 0)
    s = Schedule(warmup_steps=0, update_every=1, max_updates=None, lag=3)
    assert decisions(s, 6) == {0: [0, 1, 2, 3], 1: [4], 2: [5]}


def test_schedule_lag_beyond_the_warmup() -> None:
    s = Schedule(warmup_steps=2, update_every=3, max_updates=None, lag=5)
    assert [s.decided_at(u) for u in range(3)] == [0, 0, 3]
    assert decisions(s, 12) == {0: [0, 1], 3: [2], 6: [3]}


def test_schedule_with_max_updates_and_lag() -> None:
    # update u shapes steps 2u + 1, 2u + 2 and is decided after step 2u + 1 - 1 - 2 = 2u - 2
    s = Schedule(warmup_steps=0, update_every=2, max_updates=3, lag=2)
    assert decisions(s, 20) == {0: [0, 1], 2: [2]}
    assert s.last_step(2, 20) == 20


def test_schedule_with_updates_past_the_end() -> None:
    s = Schedule(warmup_steps=8, update_every=5, max_updates=None, lag=1)
    assert decisions(s, 10) == {7: [0]}  # update 1 would start at step 14 > 10
    assert decisions(s, 8) == {}  # update 0 would start at step 9 > 8


# -- helpers ----------------------------------------------------------------------------------------


def make(block: dict[str, Any], *, lag: int = 1, log: RunLog | None = None) -> SteeringController:
    plan = build_plan(load_steering(block))
    return SteeringController(plan, domains=DOMAINS, domain_names=NAMES, global_batch=B, seed=SEED, lag=lag, log=log)


def step_batches(sampler: SteeringSampler, first_epoch: int = 0) -> Iterator[list[int]]:
    """The sampler's stream cut into steps, epoch after epoch, as the Trainer's loader reads it."""
    for epoch in itertools.count(first_epoch):
        sampler.set_epoch(epoch)
        stream = iter(sampler)
        while batch := list(itertools.islice(stream, B)):
            yield batch


def train(
    ctrl: SteeringController,
    max_steps: int,
    *,
    start: int = 0,
    stop: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[int, list[int]]]:
    """Drive ``ctrl`` like the Trainer: the loader draws one step ahead; observe, then step_end.

    Returns the events and the indices trained at each step.
    """
    assert ctrl.sampler is not None
    stop = max_steps if stop is None else stop
    events = ctrl.begin(max_steps)
    epoch = start // ctrl.sampler.steps_per_epoch
    batches = step_batches(ctrl.sampler, epoch)
    for _ in range(epoch * ctrl.sampler.steps_per_epoch, start):
        assert next(batches) == [0] * B  # steps trained before a resume are placeholders
    trained = {}
    pending = next(batches)
    for t in range(start + 1, stop + 1):
        batch = pending
        if t < max_steps:
            pending = next(batches)  # prefetch: step t + 1 is drawn before step t ends
        trained[t] = batch
        ctrl.observe(torch.tensor(batch))
        events.extend(ctrl.step_end(t))
        if on_step is not None:
            on_step(t)
    return events, trained


def weigh(ctrl: SteeringController, step: int, losses: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The loss weights of a micro-batch (observed separately, as the Trainer mixin does)."""
    idx = indices.numpy()
    return ctrl.sample_weights(step, TrainedBatch(idx, DOMAINS[idx], losses))


def domain_counts(indices: list[int] | np.ndarray) -> list[int]:
    return np.bincount(DOMAINS[np.asarray(indices)], minlength=3).tolist()


# -- mixing ------------------------------------------------------------------------------------------

MIX_RANDOM = {"paradigm": "mix", "algorithm": "random", "warmup_steps": 2, "update_every": 3, "seed": 0}


def expected_random_mix(update: int) -> np.ndarray:
    ctx = mix_context(names=NAMES, sizes=(10, 6, 8), update=update, seed=SEED, last_step=1, max_steps=10)
    return RandomMixer(RandomMixParams()).update(ctx).numpy()


def test_mix_random_events_and_stream() -> None:
    ctrl = make(MIX_RANDOM)
    events, trained = train(ctrl, 10)
    assert [(e["step"], e["update"], e["first_step"], e["last_step"]) for e in events] == [
        (0, -1, 1, 2),
        (1, 0, 3, 5),
        (4, 1, 6, 8),
        (7, 2, 9, 10),
    ]
    assert all(e["paradigm"] == "mix" and e["algorithm"] == "random" for e in events)
    assert events[0]["proportions"] == {"a": 0.33333333, "b": 0.33333333, "c": 0.33333333}
    for event in events[1:]:
        p = expected_random_mix(event["update"])
        assert list(event["proportions"].values()) == [round(float(x), 8) for x in p]
        assert abs(sum(event["proportions"].values()) - 1.0) < 1e-7
        for step in range(event["first_step"], event["last_step"] + 1):
            counts = np.array(domain_counts(trained[step]))
            assert np.all((counts == np.floor(B * p)) | (counts == np.ceil(B * p))), (step, counts, p)
    # proportions differ from update to update
    assert len({tuple(e["proportions"].values()) for e in events}) == 4


def test_served_counts_what_was_observed_since_the_last_event() -> None:
    ctrl = make(MIX_RANDOM)
    events, trained = train(ctrl, 10)
    assert events[0]["served"] == {"a": 0, "b": 0, "c": 0}
    windows = [[1], [2, 3, 4], [5, 6, 7]]  # events at steps 1, 4 and 7
    for event, steps in zip(events[1:], windows, strict=True):
        counts = domain_counts([i for s in steps for i in trained[s]])
        assert event["served"] == dict(zip(NAMES, counts, strict=True))


def test_mix_without_warmup_has_no_initial_event() -> None:
    ctrl = make({**MIX_RANDOM, "warmup_steps": 0, "update_every": 5})
    events, _ = train(ctrl, 10)
    assert [(e["step"], e["update"], e["first_step"], e["last_step"]) for e in events] == [(0, 0, 1, 5), (4, 1, 6, 10)]


def test_static_mix_logs_once_and_serves_its_proportions() -> None:
    ctrl = make({"paradigm": "mix", "algorithm": "static", "params": {"proportions": [0.5, 0.0, 0.5]}})
    events, trained = train(ctrl, 8)
    assert without_seconds(events) == [
        {
            "step": 0,
            "paradigm": "mix",
            "algorithm": "static",
            "update": -1,
            "first_step": 1,
            "last_step": 8,
            "proportions": {"a": 0.5, "b": 0.0, "c": 0.5},
            "served": {"a": 0, "b": 0, "c": 0},
        }
    ]
    assert all(domain_counts(batch) == [2, 0, 2] for batch in trained.values())


def test_scheduled_mix_follows_the_schedule() -> None:
    block = {
        "paradigm": "mix",
        "algorithm": "scheduled",
        "update_every": 2,
        "params": {"schedule": [[1, [1, 0, 0]], [5, [0, 0, 1]]]},
    }
    events, trained = train(make(block), 6)
    # updates shape steps 1-2, 3-4, 5-6 and take the schedule at their first step
    assert [list(e["proportions"].values()) for e in events] == [[1.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 1.0]]
    assert [domain_counts(trained[s]) for s in range(1, 7)] == [[4, 0, 0]] * 2 + [[2, 0, 2]] * 2 + [[0, 0, 4]] * 2


def test_mix_domains_are_checked_at_construction() -> None:
    with pytest.raises(ConfigError, match=r"datasteer\.params\.proportions: expected 3 proportions"):
        make({"paradigm": "mix", "algorithm": "static", "params": {"proportions": [0.5, 0.5]}})


# -- selection ---------------------------------------------------------------------------------------

SELECT_RANDOM = {"paradigm": "select", "algorithm": "random", "warmup_steps": 2, "update_every": 3}


def expected_random_selection(update: int, num_samples: int) -> np.ndarray:
    ctx = select_context(
        num_samples=num_samples, domains=DOMAINS, names=NAMES, update=update, total_updates=update + 1, seed=SEED
    )
    return RandomSelector(RandomSelectParams()).select(ctx).numpy()


def test_select_random_events_and_stream() -> None:
    ctrl = make(SELECT_RANDOM)
    events, trained = train(ctrl, 10)
    assert [(e["step"], e["update"], e["first_step"], e["last_step"], e["selected"]) for e in events] == [
        (1, 0, 3, 5, 12),
        (4, 1, 6, 8, 12),
        (7, 2, 9, 10, 8),
    ]
    for event in events:
        chosen = expected_random_selection(event["update"], event["selected"])
        assert event["digest"] == digest(chosen)
        assert event["unique"] == len(set(chosen.tolist())) == event["selected"]
        assert event["domain_counts"] == dict(zip(NAMES, domain_counts(chosen), strict=True))
        served = [i for s in range(event["first_step"], event["last_step"] + 1) for i in trained[s]]
        assert Counter(served) == Counter(chosen.tolist())
    # warm-up: the seeded shuffle of the whole pool, no repeats
    assert len(set(trained[1] + trained[2])) == 8


def test_digest_is_order_sensitive_and_stable() -> None:
    assert digest(np.array([1, 2, 3])) == digest(np.array([1, 2, 3], dtype=np.int32))
    assert digest(np.array([1, 2, 3])) != digest(np.array([3, 2, 1]))
    assert len(digest(np.array([0]))) == 16


def test_select_with_a_fraction_cycles_the_selection() -> None:
    block = {**SELECT_RANDOM, "warmup_steps": 0, "update_every": 10, "params": {"fraction": 0.25}}
    events, trained = train(make(block), 6)
    assert [e["selected"] for e in events] == [6]  # 0.25 x 24, whatever the 40 samples the steps need
    chosen = expected_random_selection(0, 6).tolist()
    stream = [i for s in range(1, 7) for i in trained[s]]
    for start in range(0, 24, 6):
        assert sorted(stream[start : start + 6]) == sorted(chosen)


# -- composition -------------------------------------------------------------------------------------

COMPOSED = {
    "mix": {"algorithm": "random", "warmup_steps": 2, "update_every": 3},
    "select": {"algorithm": "random", "warmup_steps": 1, "update_every": 4},
    "seed": 0,
}
MEMBERS = [np.flatnonzero(d == DOMAINS) for d in range(3)]


def expected_selection_within_domains(update: int, quotas: dict[str, int]) -> dict[int, np.ndarray]:
    """What random selection picks in each domain: its own draw over that domain's samples."""
    chosen = {}
    for d, name in enumerate(NAMES):
        if quotas[name] == 0:
            continue
        ctx = select_context(num_samples=quotas[name], pool_size=len(MEMBERS[d]), update=update, names=NAMES, seed=SEED)
        ctx = dataclasses.replace(ctx, generator=torch_generator(SEED, "select", update, d))
        chosen[d] = MEMBERS[d][RandomSelector(RandomSelectParams()).select(ctx).numpy()]
    return chosen


def test_composed_mix_and_select_fill_each_domains_share_from_its_selection() -> None:
    ctrl = make(COMPOSED)
    events, trained = train(ctrl, 12)
    # mix updates shape steps 3, 6, 9, 12 (decided a step ahead), selections steps 2, 6, 10; at
    # step 4 the mix stage decides first, so the selection for step 6 sees the new proportions
    assert [(e["step"], e["paradigm"]) for e in events] == [
        (0, "mix"),  # warm-up proportions
        (0, "select"),
        (1, "mix"),
        (4, "mix"),
        (4, "select"),
        (7, "mix"),
        (8, "select"),
        (10, "mix"),
    ]
    sampler = ctrl.sampler
    assert isinstance(sampler, MixtureSampler)
    for step, batch in trained.items():  # the mixture sets every step's domain counts
        assert domain_counts(batch) == sampler.domain_counts(step).tolist()
    for event in (e for e in events if e["paradigm"] == "select"):
        first, last = event["first_step"], event["last_step"]
        # each domain's quota is its share of the steps under the proportions known at the decision
        assert sum(event["quotas"].values()) == event["selected"] == B * (last - first + 1)
        assert event["domain_counts"] == {n: int(q) for n, q in event["quotas"].items()}
        chosen = expected_selection_within_domains(event["update"], event["quotas"])
        assert event["digest"] == digest(np.concatenate(list(chosen.values())))
        for step in range(first, last + 1):
            for i in trained[step]:  # every served sample comes from its domain's selection
                assert i in chosen[int(DOMAINS[i])], (step, i)
    # before the first selection (step 1), the domains are drawn whole
    assert all(i in MEMBERS[int(DOMAINS[i])] for i in trained[1])


def test_composed_mix_and_weight_weights_the_mixed_batches(test_algorithms: None) -> None:
    ctrl = make(
        {
            "mix": {"algorithm": "static", "params": {"proportions": [0.5, 0.5, 0.0]}},
            "weight": {"algorithm": "_test_double"},
        }
    )
    assert ctrl.needs_sample_losses and ctrl.weights_samples
    events = ctrl.begin(2)
    assert [e["paradigm"] for e in events] == ["mix"]
    batch = ctrl.observe(torch.tensor([0, 12]), torch.tensor([0.5, 2.0]))
    assert torch.equal(ctrl.sample_weights(1, batch), torch.tensor([1.0, 4.0]))
    (event,) = ctrl.step_end(1)
    assert (event["paradigm"], event["weight_mean"]) == ("weight", 2.5)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"mix": {"algorithm": "random"}, "select": {"algorithm": "tsds", "params": {"prepared": "x"}}},
            "tsds draws from probabilities prepared over the whole pool",
        ),
        (
            {"mix": {"algorithm": "random"}, "select": {"algorithm": "near", "params": {"prepared": "x"}}},
            "prepared neighbour lists index the whole pool",
        ),
        (
            {"mix": {"algorithm": "doremi", "params": {"reference_model": "ref"}}, "weight": {"algorithm": "uniform"}},
            "doremi trains on its own domain-weighted loss",
        ),
    ],
    ids=["tsds-under-mix", "near-prepared-under-mix", "doremi-and-weight"],
)
def test_combinations_that_cannot_be_honoured_are_refused(block: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_plan(block)


# -- weighting ---------------------------------------------------------------------------------------


@dataclass
class DoubleParams:
    """No parameters."""


class DoubleWeighter(Weighter):
    """Test-only: weight 2 x loss."""

    Params = DoubleParams

    def weigh(self, ctx: WeightContext) -> torch.Tensor:
        return 2 * ctx.losses


@dataclass
class BadParams:
    """Which invalid output to return."""

    case: str = doc("Which invalid output.", default="")


class BadMixer(Mixer):
    """Test-only: returns invalid proportions at its first update."""

    Params = BadParams

    def update(self, ctx: MixContext) -> torch.Tensor:
        return {
            "sum": torch.tensor([0.5, 0.2, 0.2]),
            "negative": torch.tensor([1.2, -0.2, 0.0]),
            "length": torch.tensor([0.5, 0.5]),
            "nan": torch.tensor([float("nan"), 0.5, 0.5]),
        }[self.params.case]


class BadSelector(Selector):
    """Test-only: returns invalid indices."""

    Params = BadParams

    def select(self, ctx: SelectContext) -> torch.Tensor:
        return {
            "high": torch.tensor([0, ctx.pool_size]),
            "negative": torch.tensor([-1, 2]),
            "float": torch.tensor([0.0, 1.0]),
            "empty": torch.tensor([], dtype=torch.long),
            "2d": torch.tensor([[0, 1]]),
        }[self.params.case]


class BadWeighter(Weighter):
    """Test-only: returns invalid weights."""

    Params = BadParams

    def weigh(self, ctx: WeightContext) -> torch.Tensor:
        if self.params.case == "negative":
            return -torch.ones_like(ctx.losses)
        if self.params.case == "shape":
            return torch.ones(len(ctx.losses) + 1)
        return torch.full_like(ctx.losses, float("inf"))


class ModelSelector(Selector):
    """Test-only: needs the model."""

    Params = BadParams
    needs_model = True

    def select(self, ctx: SelectContext) -> torch.Tensor:
        return torch.arange(ctx.num_samples) % ctx.pool_size


class ReportingSelector(Selector):
    """Test-only: selects the first samples and reports how many it looked at."""

    Params = BadParams

    def __init__(self, params: BadParams) -> None:
        super().__init__(params)
        self.looked_at = 0

    def select(self, ctx: SelectContext) -> torch.Tensor:
        self.looked_at = ctx.pool_size
        return torch.arange(ctx.num_samples) % ctx.pool_size

    def report(self) -> dict[str, int | float]:
        return {"looked_at": self.looked_at}


TEST_ALGORITHMS = [
    (WEIGHTERS, "_test_double", DoubleWeighter),
    (SELECTORS, "_test_reporting", ReportingSelector),
    (MIXERS, "_test_bad", BadMixer),
    (SELECTORS, "_test_bad", BadSelector),
    (WEIGHTERS, "_test_bad", BadWeighter),
    (SELECTORS, "_test_model", ModelSelector),
]


@pytest.fixture
def test_algorithms() -> Iterator[None]:
    for registry, name, cls in TEST_ALGORITHMS:
        registry.register(name)(cls)
    try:
        yield
    finally:
        for registry, name, _ in TEST_ALGORITHMS:
            registry._specs.pop(name, None)


def test_a_selectors_report_is_written_to_its_records_summed_over_domains(test_algorithms: None) -> None:
    alone = {"paradigm": "select", "algorithm": "_test_reporting", "update_every": 5}
    events, _ = train(make(alone), 5)
    assert [e["looked_at"] for e in events] == [len(DOMAINS)]
    composed = {"mix": {"algorithm": "static"}, "select": {"algorithm": "_test_reporting", "update_every": 5}}
    events, _ = train(make(composed), 5)
    (select,) = [e for e in events if e["paradigm"] == "select"]
    assert select["looked_at"] == len(DOMAINS)  # each domain's selector saw its members; summed


def test_weights_are_one_during_warmup_then_the_weighters(test_algorithms: None) -> None:
    ctrl = make({"paradigm": "weight", "algorithm": "_test_double", "warmup_steps": 2})
    assert ctrl.sampler is None and ctrl.needs_sample_losses
    assert ctrl.begin(5) == []
    losses = torch.tensor([0.5, 1.0])
    for step in (1, 2):
        ctrl.observe(torch.tensor([0, 10]))
        assert torch.equal(weigh(ctrl, step, losses, torch.tensor([0, 10])), torch.ones(2))
        assert ctrl.step_end(step) == []
    # step 3, two micro-batches: weights 2 x loss
    ctrl.observe(torch.tensor([1, 2]))
    w1 = weigh(ctrl, 3, torch.tensor([0.5, 1.0]), torch.tensor([1, 2]))
    ctrl.observe(torch.tensor([16, 23]))
    w2 = weigh(ctrl, 3, torch.tensor([2.0, 0.25]), torch.tensor([16, 23]))
    assert torch.equal(w1, torch.tensor([1.0, 2.0])) and torch.equal(w2, torch.tensor([4.0, 0.5]))
    (event,) = ctrl.step_end(3)
    assert without_seconds([event]) == [
        {
            "step": 3,
            "paradigm": "weight",
            "algorithm": "_test_double",
            "weight_mean": 1.875,  # (1 + 2 + 4 + 0.5) / 4
            "weight_min": 0.5,
            "weight_max": 4.0,
            "weight_ess": 7.5**2 / (1 + 4 + 16 + 0.25) / 4,  # (sum w)^2 / sum w^2, per sample
            "weight_domain_mean": {"a": 1.5, "c": 2.25},  # indices 1, 2 are a; 16, 23 are c
            "nonfinite": 0,  # samples left out for a NaN or infinite loss
            "served": {"a": 4, "b": 2, "c": 2},  # includes the two warm-up steps, as for mix/select
        }
    ]
    # the statistics restart with each step
    weigh(ctrl, 4, torch.tensor([3.0]), torch.tensor([5]))
    (event,) = ctrl.step_end(4)
    assert (event["weight_mean"], event["weight_min"], event["weight_max"]) == (6.0, 6.0, 6.0)


def test_uniform_weights() -> None:
    ctrl = make({"paradigm": "weight", "algorithm": "uniform"})
    ctrl.begin(3)
    weights = weigh(ctrl, 1, torch.tensor([0.1, 5.0, 2.0]), torch.tensor([0, 1, 2]))
    assert torch.equal(weights, torch.ones(3))
    (event,) = ctrl.step_end(1)
    assert (event["weight_mean"], event["weight_min"], event["weight_max"]) == (1.0, 1.0, 1.0)


def test_weighting_keeps_no_sampler_state() -> None:
    ctrl = make({"paradigm": "weight", "algorithm": "uniform"})
    state = ctrl.state_dict(3)
    assert state["sampler"] is None and state["stages"]["weight"]["algorithm"] == "uniform"
    other = make({"paradigm": "weight", "algorithm": "uniform"})
    other.load_state_dict(state)
    assert other.begin(5) == []  # a resumed run does not start over


# -- invalid algorithm outputs -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["sum", "negative", "length", "nan"])
def test_invalid_proportions_are_rejected(test_algorithms: None, case: str) -> None:
    ctrl = make({"paradigm": "mix", "algorithm": "_test_bad", "params": {"case": case}})
    with pytest.raises(SteeringStateError, match="_test_bad returned"):
        ctrl.begin(10)  # update 0 shapes step 1, so it is decided at train begin


@pytest.mark.parametrize("case", ["high", "negative", "float", "empty", "2d"])
def test_invalid_selections_are_rejected(test_algorithms: None, case: str) -> None:
    ctrl = make({"paradigm": "select", "algorithm": "_test_bad", "warmup_steps": 3, "params": {"case": case}})
    assert ctrl.begin(10) == []
    ctrl.step_end(1)
    with pytest.raises(
        SteeringStateError, match=r"_test_bad (must return a non-empty 1-D integer tensor|returned indices outside)"
    ):
        ctrl.step_end(2)  # decided after step 2 for step 4


@pytest.mark.parametrize("case", ["negative", "shape", "inf"])
def test_invalid_weights_are_rejected(test_algorithms: None, case: str) -> None:
    ctrl = make({"paradigm": "weight", "algorithm": "_test_bad", "params": {"case": case}})
    ctrl.begin(3)
    with pytest.raises(SteeringStateError, match="_test_bad returned invalid weights"):
        weigh(ctrl, 1, torch.tensor([0.5, 1.0]), torch.tensor([0, 1]))


def test_model_algorithm_without_model_ops(test_algorithms: None) -> None:
    ctrl = make({"paradigm": "select", "algorithm": "_test_model"})
    with pytest.raises(SteeringStateError, match="_test_model needs the model"):
        ctrl.begin(4)


# -- state ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [MIX_RANDOM, SELECT_RANDOM, COMPOSED], ids=["mix", "select", "mix+select"])
@pytest.mark.parametrize("t", [1, 4, 5, 6, 8])
def test_state_round_trip(tmp_path: Path, block: dict[str, Any], t: int) -> None:
    full_log = RunLog(tmp_path / "full.jsonl")
    full_events, full_trained = train(make(block, log=full_log), 10)

    # the interrupted run checkpoints at t and writes two more steps before it stops
    log = RunLog(tmp_path / "run.jsonl")
    states: dict[int, dict[str, Any]] = {}
    first = make(block, log=log)
    train(first, 10, stop=min(t + 2, 10), on_step=lambda s: states.update({s: first.state_dict(s)}))
    buffer = io.BytesIO()
    torch.save(states[t], buffer)  # as the checkpoint stores it
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = make(block, log=log)
    resumed.load_state_dict(state)
    assert [r["step"] for r in read_records(log.path)] == [e["step"] for e in full_events if e["step"] <= t]
    events, trained = train(resumed, 10, start=t)

    assert without_seconds(events) == without_seconds([e for e in full_events if e["step"] > t])
    assert trained == {s: full_trained[s] for s in range(t + 1, 11)}
    assert without_seconds(read_records(log.path)) == without_seconds(read_records(full_log.path))


def test_state_of_another_algorithm_is_rejected() -> None:
    ctrl = make(MIX_RANDOM)
    ctrl.begin(10)
    state = ctrl.state_dict(0)
    static = make({"paradigm": "mix", "algorithm": "static"})
    with pytest.raises(SteeringStateError, match="steered by mix/random, this run by mix/static"):
        static.load_state_dict(state)
    select = make(SELECT_RANDOM)
    with pytest.raises(SteeringStateError, match="steered by mix/random, this run by select/random"):
        select.load_state_dict(state)


def test_state_of_another_version_is_rejected() -> None:
    ctrl = make(MIX_RANDOM)
    ctrl.begin(10)
    state = {**ctrl.state_dict(0), "version": STATE_VERSION + 1}
    with pytest.raises(SteeringStateError, match="unsupported steering state version"):
        make(MIX_RANDOM).load_state_dict(state)


def test_state_of_another_seed_is_rejected() -> None:
    ctrl = make(MIX_RANDOM)
    ctrl.begin(10)
    state = ctrl.state_dict(0)
    other = SteeringController(
        build_plan(MIX_RANDOM), domains=DOMAINS, domain_names=NAMES, global_batch=B, seed=SEED + 1, lag=1
    )
    with pytest.raises(SteeringStateError, match="seed="):
        other.load_state_dict(state)


# -- run log --------------------------------------------------------------------------------------------


def test_run_log_holds_the_returned_events(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "out" / "steering.jsonl")
    events, _ = train(make(SELECT_RANDOM, log=log), 10)
    assert read_records(log.path) == events
    assert list(read_records(log.path)[0]) == [
        "step",
        "paradigm",
        "algorithm",
        "update",
        "first_step",
        "last_step",
        "selected",
        "unique",
        "digest",
        "domain_counts",
        "served",
        "seconds",
    ]


def test_a_fresh_run_replaces_an_old_log(tmp_path: Path) -> None:
    path = tmp_path / "steering.jsonl"
    path.write_text('{"step": 99}\n')
    events, _ = train(make(SELECT_RANDOM, log=RunLog(path)), 4)
    assert [r["step"] for r in read_records(path)] == [1] and len(events) == 1


def test_truncate_after(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "steering.jsonl")
    for step in (0, 1, 1, 4, 7):
        log.write({"step": step, "value": float("nan") if step == 7 else step / 2})
    assert read_records(log.path)[-1] == {"step": 7, "value": "nan"}  # strict JSON: no NaN literal
    log.truncate_after(1)
    assert read_records(log.path) == [{"step": 0, "value": 0.0}, {"step": 1, "value": 0.5}, {"step": 1, "value": 0.5}]
    log.write({"step": 1, "paradigm": "end"})  # a closing record goes: the resumed run writes its own
    log.truncate_after(1)
    assert len(read_records(log.path)) == 3
    log.truncate_after(-1)
    assert read_records(log.path) == []


def test_the_closing_record_holds_what_the_last_window_served(tmp_path: Path) -> None:
    path = tmp_path / "steering.jsonl"
    ctrl = make(SELECT_RANDOM, log=RunLog(path))
    _, trained = train(ctrl, 10)  # the last selection record is at step 7
    closing = ctrl.end(10)
    assert closing["paradigm"] == "end" and closing["step"] == 10
    served = [i for s in (8, 9, 10) for i in trained[s]]
    assert closing["served"] == dict(zip(NAMES, domain_counts(served), strict=True))
    assert read_records(path)[-1] == closing
    total = sum(np.array(list(r["served"].values())) for r in read_records(path))
    assert total.sum() == sum(len(b) for b in trained.values())  # every served sample is on record


def test_disabled_log_writes_nothing(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "steering.jsonl", enabled=False)
    log.write({"step": 1})
    log.truncate_after(0)
    assert not log.path.exists()


def test_test_algorithms_do_not_leak() -> None:
    for registry, name, _ in TEST_ALGORITHMS:
        assert name not in registry.names()


def test_a_mixer_rejects_an_empty_domain_before_training() -> None:
    plan = build_plan({"paradigm": "mix", "algorithm": "random"})
    with pytest.raises(ConfigError, match=r"domains \['c'\] have no training samples"):
        SteeringController(plan, domains=np.array([0, 0, 1, 1]), domain_names=NAMES, global_batch=B, seed=SEED, lag=1)


def test_a_step_without_weighted_batches_writes_no_weight_record(test_algorithms: None) -> None:
    ctrl = make({"paradigm": "weight", "algorithm": "_test_double"})
    ctrl.begin(3)
    assert ctrl.step_end(1) == []
