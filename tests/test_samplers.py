"""Tests of datasteer.samplers: systematic counts, the selection and mixture streams, and resume."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from datasteer.errors import SteeringStateError
from datasteer.rng import derive_seed
from datasteer.samplers import MixtureSampler, SelectionSampler, SteeringSampler, systematic_counts

# -- systematic_counts ------------------------------------------------------------------------


def test_systematic_counts_by_hand() -> None:
    # total 4, p = (0.3, 0.7): edges 0, 1.2, 4; points u, 1 + u, 2 + u, 3 + u.
    assert systematic_counts(np.array([0.3, 0.7]), 4, 0.1).tolist() == [2, 2]  # 0.1 and 1.1 lie below 1.2
    assert systematic_counts(np.array([0.3, 0.7]), 4, 0.5).tolist() == [1, 3]  # only 0.5 lies below 1.2
    assert systematic_counts(np.array([0.5, 0.0, 0.5]), 4, 0.99).tolist() == [2, 0, 2]


def test_systematic_counts_sum_and_round() -> None:
    gen = np.random.default_rng(derive_seed(0, "test-systematic"))
    for _ in range(200):
        k = int(gen.integers(1, 6))
        p = gen.dirichlet(np.ones(k))
        total = int(gen.integers(1, 50))
        counts = systematic_counts(p, total, float(gen.random()))
        assert counts.sum() == total
        expected = total * p
        assert np.all((counts == np.floor(expected)) | (counts == np.ceil(expected))), (p, total, counts)


def test_systematic_counts_are_unbiased() -> None:
    # total * p = (1.23, 3.77, 5.0): their fractional edges are multiples of 1/1000, so the mean
    # over the midpoints of a 1000-point grid of u is exactly the expectation over u ~ U[0, 1).
    p = np.array([0.123, 0.377, 0.5])
    grid = (np.arange(1000) + 0.5) / 1000
    mean = np.mean([systematic_counts(p, 10, float(u)) for u in grid], axis=0)
    np.testing.assert_allclose(mean, [1.23, 3.77, 5.0], rtol=0, atol=1e-9)


# -- helpers ------------------------------------------------------------------------------------


def steps_of(sampler: SteeringSampler, stream: list[int]) -> list[list[int]]:
    b = sampler.global_batch
    return [stream[i : i + b] for i in range(0, len(stream), b)]


def take_steps(iterator, b: int, n: int) -> list[list[int]]:
    """Pull ``n`` steps of ``b`` indices, as a data loader's batch sampler would."""
    return [list(itertools.islice(iterator, b)) for _ in range(n)]


# -- SelectionSampler -------------------------------------------------------------------------


def test_selection_before_any_plan_covers_the_pool_each_epoch() -> None:
    sampler = SelectionSampler(pool_size=12, global_batch=4, seed=0)
    assert sampler.steps_per_epoch == 3 and len(sampler) == 12
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(12))
    assert sorted(second) == list(range(12))
    assert first != second  # each epoch is a new permutation


def test_selection_before_any_plan_covers_the_pool_across_epoch_boundaries() -> None:
    # 10 samples, batch 3: 3 steps (9 indices) per epoch; the stream is one permutation of the
    # pool after another, whatever the epoch boundaries.
    sampler = SelectionSampler(pool_size=10, global_batch=3, seed=1)
    stream = [i for _ in range(4) for i in sampler]
    assert len(stream) == 36
    for start in range(0, 30, 10):
        assert sorted(stream[start : start + 10]) == list(range(10))


def test_selection_plan_serves_exactly_the_selection() -> None:
    sampler = SelectionSampler(pool_size=20, global_batch=4, seed=0, steps_per_epoch=8)
    selection = [3, 3, 7, 19, 0, 5, 5, 5, 11, 2, 8, 13]  # 12 = 3 steps x 4, with repeats
    sampler.add_plan(3, selection)
    steps = steps_of(sampler, list(sampler))
    assert Counter(itertools.chain(*steps[2:5])) == Counter(selection)
    # before step 3 the pool shuffle is served: the first 8 positions of the pool permutation
    assert len(set(itertools.chain(*steps[:2]))) == 8


def test_selection_cycles_with_a_reshuffle() -> None:
    sampler = SelectionSampler(pool_size=50, global_batch=4, seed=0, steps_per_epoch=9)
    selection = list(range(10, 22))  # 12 indices: 3 steps per cycle
    sampler.add_plan(1, selection)
    steps = steps_of(sampler, list(sampler))
    cycles = [list(itertools.chain(*steps[c * 3 : c * 3 + 3])) for c in range(3)]
    for cycle in cycles:
        assert sorted(cycle) == selection
    assert cycles[0] != cycles[1] != cycles[2]


def test_selection_cycle_that_straddles_steps() -> None:
    # 6 selected, batch 4: step 1 = cycle 0 positions 0-3, step 2 = 4, 5 of cycle 0 and 0, 1 of cycle 1.
    sampler = SelectionSampler(pool_size=30, global_batch=4, seed=2, steps_per_epoch=3)
    selection = [1, 4, 9, 16, 25, 29]
    sampler.add_plan(1, selection)
    stream = list(sampler)
    assert sorted(stream[:6]) == selection
    assert sorted(stream[6:12]) == selection


def test_selection_is_deterministic_in_seed() -> None:
    def stream(seed: int) -> list[int]:
        sampler = SelectionSampler(pool_size=16, global_batch=4, seed=seed)
        sampler.add_plan(3, list(range(8)))
        return list(sampler)

    assert stream(5) == stream(5)
    assert stream(5) != stream(6)


def test_later_plan_takes_over() -> None:
    sampler = SelectionSampler(pool_size=20, global_batch=2, seed=0, steps_per_epoch=6)
    sampler.add_plan(1, [0, 1])
    sampler.add_plan(4, [8, 9])
    steps = steps_of(sampler, list(sampler))
    assert [sorted(s) for s in steps] == [[0, 1]] * 3 + [[8, 9]] * 3


def test_plan_for_a_drawn_step_raises() -> None:
    sampler = SelectionSampler(pool_size=20, global_batch=2, seed=0)
    stream = iter(sampler)
    take_steps(stream, 2, 2)  # steps 1 and 2 drawn
    with pytest.raises(SteeringStateError, match="arrived after the data loader drew step 2"):
        sampler.add_plan(2, [1, 2])
    sampler.add_plan(3, [1, 2])  # the next undrawn step is fine
    assert sorted(take_steps(stream, 2, 1)[0]) == [1, 2]


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        ([], "non-empty 1-D"),
        ([[1, 2], [3, 4]], "non-empty 1-D"),
        ([1, 20], r"must lie in \[0, 20\)"),
        ([-1, 3], r"must lie in \[0, 20\)"),
    ],
)
def test_invalid_selection_plans(plan: list, expected: str) -> None:
    sampler = SelectionSampler(pool_size=20, global_batch=2, seed=0)
    with pytest.raises(ValueError, match=expected):
        sampler.add_plan(1, plan)


def test_invalid_sampler_arguments() -> None:
    with pytest.raises(ValueError, match="empty"):
        SelectionSampler(pool_size=0, global_batch=2, seed=0)
    with pytest.raises(ValueError, match="global batch must be >= 1"):
        SelectionSampler(pool_size=4, global_batch=0, seed=0)


# -- MixtureSampler ---------------------------------------------------------------------------


DOMAINS = np.array([0] * 6 + [1] * 4 + [2] * 10)


def mixture(proportions: list[float], global_batch: int = 4, seed: int = 0, steps_per_epoch: int | None = None):
    sampler = MixtureSampler(DOMAINS, 3, global_batch, seed, steps_per_epoch)
    sampler.add_plan(1, proportions)
    return sampler


def test_mixture_step_counts_are_floor_or_ceil() -> None:
    p = np.array([0.3, 0.45, 0.25])  # B * p = 1.5, 2.25, 1.25 with B = 5
    sampler = mixture(p.tolist(), global_batch=5, steps_per_epoch=40)
    totals = np.zeros(3)
    for step in steps_of(sampler, list(sampler)):
        counts = np.bincount(DOMAINS[step], minlength=3)
        assert np.all((counts == np.floor(5 * p)) | (counts == np.ceil(5 * p))), counts
        totals += counts
    # 40 steps: each domain's total stays within one batch of 40 * 5 * p (systematic sampling is unbiased)
    assert np.all(np.abs(totals - 200 * p) <= 5), totals


def test_mixture_draws_each_domain_without_replacement_then_reshuffles() -> None:
    # B * p = (2, 2, 0) exactly: domain 0 (6 members) is exhausted every 3 steps, domain 1 (4) every 2.
    sampler = mixture([0.5, 0.5, 0.0], steps_per_epoch=12)
    steps = steps_of(sampler, list(sampler))
    zero = [[i for i in step if DOMAINS[i] == 0] for step in steps]
    one = [[i for i in step if DOMAINS[i] == 1] for step in steps]
    assert all(len(z) == 2 and len(o) == 2 for z, o in zip(zero, one, strict=True))
    assert not any(DOMAINS[i] == 2 for step in steps for i in step)
    for start in range(0, 12, 3):
        assert sorted(itertools.chain(*zero[start : start + 3])) == list(range(6))
    for start in range(0, 12, 2):
        assert sorted(itertools.chain(*one[start : start + 2])) == [6, 7, 8, 9]
    # a new permutation per pass: the pairs drawn in the first two passes differ somewhere
    assert [sorted(z) for z in zero[:3]] != [sorted(z) for z in zero[3:6]]


def test_mixture_proportions_change_mid_stream() -> None:
    sampler = mixture([0.5, 0.5, 0.0], steps_per_epoch=6)
    stream = iter(sampler)
    early = take_steps(stream, 4, 2)
    sampler.add_plan(4, [0.0, 0.0, 1.0])
    rest = take_steps(stream, 4, 4)
    steps = early + rest
    assert [np.bincount(DOMAINS[s], minlength=3).tolist() for s in steps] == [[2, 2, 0]] * 3 + [[0, 0, 4]] * 3
    # domain 2 starts its first pass: 12 draws of its 10 members cover all of them, two twice
    counts = Counter(i for s in steps[3:6] for i in s)
    assert sorted(counts) == list(range(10, 20))
    assert sorted(counts.values()) == [1] * 8 + [2] * 2


def test_mixture_stream_interleaves_domains() -> None:
    # Micro-batches must mix domains: the step's indices are shuffled, not grouped by domain.
    sampler = mixture([0.3, 0.2, 0.5], global_batch=10, steps_per_epoch=10)
    steps = steps_of(sampler, list(sampler))
    grouped = [sorted(s, key=lambda i: DOMAINS[i]) for s in steps]
    assert sum(s != g for s, g in zip(steps, grouped, strict=True)) > 5


def test_mixture_zero_sample_domain_with_positive_proportion() -> None:
    sampler = MixtureSampler(np.array([0, 0, 2, 2]), 3, 2, 0)
    with pytest.raises(ValueError, match=r"domains \[1\] have no samples"):
        sampler.add_plan(1, [0.5, 0.25, 0.25])
    sampler.add_plan(1, [0.5, 0.0, 0.5])  # zero proportion for the empty domain is fine


def test_mixture_plan_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match=r"expected 3 proportions"):
        MixtureSampler(DOMAINS, 3, 4, 0).add_plan(1, [0.5, 0.5])


def test_mixture_without_a_plan_raises() -> None:
    with pytest.raises(SteeringStateError, match="no steering plan covers step 1"):
        list(MixtureSampler(DOMAINS, 3, 4, 0))


def test_mixture_is_deterministic_in_seed() -> None:
    def stream(seed: int) -> list[int]:
        return list(mixture([0.2, 0.3, 0.5], seed=seed, steps_per_epoch=5))

    assert stream(3) == stream(3)
    assert stream(3) != stream(4)


# -- epochs and resume --------------------------------------------------------------------------


def make(kind: str, seed: int = 0) -> SteeringSampler:
    if kind == "select":
        sampler: SteeringSampler = SelectionSampler(pool_size=20, global_batch=4, seed=seed)
        sampler.add_plan(3, [1, 2, 3, 5, 8, 13, 17, 19])
        return sampler
    return mixture([0.25, 0.25, 0.5], seed=seed)


@pytest.mark.parametrize("kind", ["select", "mix"])
def test_len_and_two_epochs(kind: str) -> None:
    sampler = make(kind)
    assert sampler.steps_per_epoch == 5 and len(sampler) == 20
    epochs = [list(sampler), list(sampler)]
    assert [len(e) for e in epochs] == [20, 20]
    reference = make(kind)
    expected = [reference.indices_for_step(s).tolist() for s in range(1, 11)]
    assert steps_of(sampler, epochs[0] + epochs[1]) == expected
    assert sampler.max_drawn_step == 10


@pytest.mark.parametrize("kind", ["select", "mix"])
def test_set_epoch_restarts_at_that_epoch(kind: str) -> None:
    sampler = make(kind)
    full = list(sampler) + list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == full[20:]


@pytest.mark.parametrize("kind", ["select", "mix"])
@pytest.mark.parametrize("t", [2, 5, 7])
def test_state_round_trip(kind: str, t: int) -> None:
    uninterrupted = make(kind)
    stream = [i for _ in range(3) for i in uninterrupted]
    expected = steps_of(uninterrupted, stream)

    original = make(kind)
    iterator = itertools.chain(iter(original), iter(original))
    take_steps(iterator, 4, t)
    state = original.state_dict(t)
    assert state["step"] == t

    resumed = make(kind)
    resumed.load_state_dict(state)
    epoch = t // resumed.steps_per_epoch
    got = steps_of(resumed, [i for _ in range(epoch, 3) for i in resumed])
    first = epoch * resumed.steps_per_epoch + 1
    for step, indices in enumerate(got, start=first):
        if step <= t:
            assert indices == [0, 0, 0, 0], step  # already trained: placeholders the Trainer skips
        else:
            assert indices == expected[step - 1], step


def test_resumed_plans_must_not_reach_back() -> None:
    sampler = make("select")
    resumed = make("select")
    resumed.load_state_dict(sampler.state_dict(4))
    with pytest.raises(SteeringStateError):
        resumed.add_plan(4, [1, 2])
    resumed.add_plan(5, [1, 2])


def test_state_keeps_plans_registered_ahead() -> None:
    sampler = SelectionSampler(pool_size=20, global_batch=2, seed=0, steps_per_epoch=10)
    sampler.add_plan(3, [0, 1])
    sampler.add_plan(6, [4, 5])
    state = sampler.state_dict(2)
    assert [s for s, _ in state["plans"]] == [3, 6]
    resumed = SelectionSampler(pool_size=20, global_batch=2, seed=0, steps_per_epoch=10)
    resumed.load_state_dict(state)
    assert [sorted(resumed.indices_for_step(s).tolist()) for s in (3, 5, 6)] == [[0, 1], [0, 1], [4, 5]]


@pytest.mark.parametrize(
    ("kind", "key", "value"),
    [
        ("select", "pool_size", 21),
        ("select", "global_batch", 2),
        ("select", "seed", 1),
        ("mix", "global_batch", 2),
        ("mix", "seed", 1),
    ],
)
def test_mismatched_state_is_rejected(kind: str, key: str, value: int) -> None:
    state = make(kind).state_dict(0)
    args = {"pool_size": 20, "global_batch": 4, "seed": 0, key: value}
    if kind == "select":
        other: SteeringSampler = SelectionSampler(**args)
    else:
        other = MixtureSampler(DOMAINS, 3, args["global_batch"], args["seed"])
    with pytest.raises(SteeringStateError, match=f"checkpoint steering state has {key}=.*, this run has {value}"):
        other.load_state_dict(state)


def test_mixture_pool_size_mismatch() -> None:
    state = make("mix").state_dict(0)
    other = MixtureSampler(np.append(DOMAINS, 2), 3, 4, 0)
    with pytest.raises(SteeringStateError, match="pool_size=20, this run has 21"):
        other.load_state_dict(state)


def test_mixture_steps_must_be_drawn_in_order() -> None:
    sampler = make("mix")
    step_one = sampler.indices_for_step(1).tolist()
    with pytest.raises(SteeringStateError, match="the mixture stream is at step 2, asked for 4"):
        sampler.indices_for_step(4)
    assert sampler.indices_for_step(1).tolist() == step_one  # a recent step can be redrawn, identically
