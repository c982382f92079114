"""RHO-LOSS selection: the reducible loss, the top-k rule and the candidate stream, by hand."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError, NonFiniteInputError, SteeringStateError
from datasteer.selectors.base import candidate_count
from datasteer.selectors.rho_loss import RhoLossParams, RhoLossSelector, top_reducible
from tests.factories import select_context
from tests.fakes import FakeOps

REF = "outputs/rho_loss/irreducible"
NAN, INF = math.nan, math.inf


def selector(fraction: float = 0.5) -> RhoLossSelector:
    return RhoLossSelector(RhoLossParams(reference_model=REF, fraction=fraction))


def candidates_of(ops: FakeOps) -> list[list[int]]:
    """The candidate batch of each update (the rows scored with the live model)."""
    return [c.indices for c in ops.calls_to("sample_losses")]


def test_candidate_count_is_selection_over_fraction_rounded_up() -> None:
    assert candidate_count(8, 0.1) == 80  # 8 / 0.1 is 80.00000000000001 in floats
    assert candidate_count(3, 0.25) == 12
    assert candidate_count(5, 0.3) == 17  # 16.67
    assert candidate_count(1, 0.99) == 2


def test_top_reducible_takes_the_largest_and_breaks_ties_by_position() -> None:
    # losses 4.0 2.5 6.0 3.0 5.0 minus irreducible 1.0 0.5 5.5 0.0 2.0
    reducible = torch.tensor([3.0, 2.0, 0.5, 3.0, 3.0])
    assert top_reducible(reducible, 2).tolist() == [0, 3]
    assert top_reducible(reducible, 4).tolist() == [0, 3, 4, 1]
    assert top_reducible(torch.tensor([1.0, NAN, 2.0, INF, -INF]), 5).tolist() == [2, 0]


def test_keeps_the_learnable_not_the_noisy_by_hand() -> None:
    """Pool of 4 = n_B (2 / 0.5): scored whole. The highest losses are samples 1 and 3, but
    sample 1 is as hard for the IL model (noise): rho = 1.5, 0.5, 2.9, 3.0 keeps 3 and 2."""
    ops = FakeOps(losses=torch.tensor([2.0, 5.0, 3.0, 4.0]), reference_losses=torch.tensor([0.5, 4.5, 0.1, 1.0]))
    chosen = selector(0.5).select(select_context(ops=ops, num_samples=2))
    assert chosen.tolist() == [3, 2]
    assert candidates_of(ops) == [[0, 1, 2, 3]]


def test_candidates_pass_over_the_pool_and_the_selection_is_their_top() -> None:
    """Pool of 10, 2 kept of 4 candidates per update: updates 0 and 1 score 8 different samples;
    update 2 takes the pass's last 2 and 2 of the next pass."""
    losses = torch.arange(10.0)
    irreducible = torch.tensor([0.0, 0.5, 3.0, 0.2, 4.0, 1.0, 5.5, 0.1, 6.0, 2.0])  # rho = losses - this
    ops = FakeOps(losses=losses, reference_losses=irreducible)
    rho = selector(0.5)
    chosen = [rho.select(select_context(ops=ops, num_samples=2, update=u)).tolist() for u in range(3)]
    batches = candidates_of(ops)
    assert all(len(b) == 4 and b == sorted(set(b)) for b in batches)
    assert not set(batches[0]) & set(batches[1])
    tail = set(range(10)) - set(batches[0]) - set(batches[1])
    assert len(tail) == 2 and tail <= set(batches[2])
    for batch, kept in zip(batches, chosen, strict=True):
        scores = {i: float(losses[i] - irreducible[i]) for i in batch}
        assert kept == sorted(batch, key=lambda i: (-scores[i], i))[:2]
    passes = rho.passes
    assert passes.position == 4 and passes.order is not None  # the tail opened the new pass
    assert sorted(passes.order.tolist()) == list(range(10))


def test_irreducible_losses_are_computed_once_per_sample() -> None:
    ops = FakeOps(losses=torch.arange(6.0), reference_losses=torch.zeros(6))
    rho = selector(0.5)  # 4 candidates of a pool of 6: the second update repeats 2 samples
    rho.select(select_context(ops=ops, num_samples=2, update=0))
    assert rho.report() == {"nonfinite": 0, "irreducible_computed": 4}
    rho.select(select_context(ops=ops, num_samples=2, update=1))
    asked = [c.indices for c in ops.calls_to("reference_losses")]
    assert len(asked[0]) == 4 and len(set(asked[0]) | set(asked[1])) == 6 and not set(asked[0]) & set(asked[1])
    assert rho.report()["irreducible_computed"] == len(asked[1]) == 2
    assert rho.known is not None and bool(rho.known.all())


def test_non_finite_candidates_are_never_kept_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    # rho = 1.0, NaN, 2.0, 9 - inf = -inf, 1.5: samples 1 and 3 are left out
    ops = FakeOps(
        losses=torch.tensor([1.0, NAN, 3.0, 9.0, 2.0]), reference_losses=torch.tensor([0.0, 0.0, 1.0, INF, 0.5])
    )
    rho = selector(0.5)
    with caplog.at_level(logging.WARNING):
        chosen = rho.select(select_context(ops=ops, num_samples=3))  # n_B = 6 >= 5: the whole pool
    assert chosen.tolist() == [2, 4, 0]
    assert rho.report() == {"nonfinite": 2, "irreducible_computed": 5}
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING):
        fewer = rho.select(select_context(ops=ops, num_samples=4))
    assert fewer.tolist() == [2, 4, 0] and "only 3 candidates have a finite reducible loss" in caplog.text
    assert rho.report() == {"nonfinite": 2, "irreducible_computed": 0}


def test_no_finite_candidate_keeps_the_selection_in_force() -> None:
    ops = FakeOps(losses=torch.full((3,), NAN), reference_losses=torch.zeros(3))
    rho = selector(0.25)  # n_B = 4 >= 3: the whole pool
    with pytest.raises(NonFiniteInputError, match="none of the 3 candidates has a finite reducible loss"):
        rho.select(select_context(ops=ops, num_samples=1))
    assert rho.report() == {"nonfinite": 3, "irreducible_computed": 3}


def test_a_pool_not_larger_than_the_selection_is_kept_whole_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from datasteer.selectors.base import _warn_no_choice

    _warn_no_choice.cache_clear()
    ops = FakeOps(losses=torch.tensor([1.0, 2.0]), reference_losses=torch.zeros(2))
    with caplog.at_level(logging.WARNING):
        chosen = selector(0.1).select(select_context(ops=ops, num_samples=3))
    assert chosen.tolist() == [1, 0]
    assert "rho_loss: keeps the best 3 of only 2 candidates" in caplog.text


def test_state_round_trip_continues_the_pass_without_recomputing() -> None:
    losses = [torch.arange(10.0) * (u + 1) for u in range(4)]  # the model changes between updates
    a, b = selector(0.25), selector(0.25)  # 8 candidates per update: update 1 crosses the pass
    ops = FakeOps(losses=losses, reference_losses=torch.linspace(0.0, 3.0, 10))
    for u in range(2):
        a.select(select_context(ops=ops, num_samples=2, update=u))
    b.load_state_dict(a.state_dict())
    again = FakeOps(losses=losses[2:], reference_losses=torch.linspace(0.0, 3.0, 10))
    assert torch.equal(
        a.select(select_context(ops=ops, num_samples=2, update=2)),
        b.select(select_context(ops=again, num_samples=2, update=2)),
    )
    assert again.calls_to("reference_losses") == []  # every irreducible loss was in the state
    assert a.passes.position == b.passes.position


def test_irreducible_losses_of_another_il_model_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    a = selector()
    a.select(select_context(ops=FakeOps(losses=torch.ones(4), reference_losses=torch.zeros(4)), num_samples=2))
    b = RhoLossSelector(RhoLossParams(reference_model="elsewhere", fraction=0.5))
    with caplog.at_level(logging.WARNING):
        b.load_state_dict(a.state_dict())
    assert b.irreducible is None and b.known is None and "dropped and computed again" in caplog.text
    ops = FakeOps(losses=torch.ones(4), reference_losses=torch.zeros(4))
    b.select(select_context(ops=ops, num_samples=2))
    assert len(ops.calls_to("reference_losses")) == 1


def test_a_state_for_another_pool_is_refused() -> None:
    a = selector()
    a.select(select_context(ops=FakeOps(losses=torch.ones(4), reference_losses=torch.zeros(4)), num_samples=2))
    b = selector()
    b.load_state_dict(a.state_dict())
    ops = FakeOps(losses=torch.ones(6), reference_losses=torch.zeros(6))
    with pytest.raises(SteeringStateError, match="the state is for a pool of 4 samples, this pool has 6"):
        b.select(select_context(ops=ops, num_samples=2))


def test_it_compares_to_its_il_model() -> None:
    from datasteer.capabilities import ComparesToReference

    rho = selector()
    assert isinstance(rho, ComparesToReference) and rho.reference_model() == REF


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "reference_model"),
        ({"reference_model": " "}, "reference_model: give the directory of the irreducible-loss model"),
        ({"reference_model": REF, "fraction": 0}, "fraction: must be in (0, 1)"),
        ({"reference_model": REF, "fraction": 1.0}, "fraction: must be in (0, 1) (1 would keep every candidate)"),
        ({"reference_model": REF, "fraction": 1.5}, "fraction: must be in (0, 1)"),
        ({"reference_model": REF, "candidates": 10}, "candidates: unknown key"),
    ],
)
def test_bad_params(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_dataclass(RhoLossParams, raw, "datasteer.params")
    assert message in str(err.value)
