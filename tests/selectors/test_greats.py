"""GREATS: the greedy marginal-gain rule, the validation gradient and the candidate batches, by hand."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError, NonFiniteInputError
from datasteer.selectors.greats import GreatsParams, GreatsSelector, greedy_selection
from tests.factories import select_context
from tests.fakes import FakeOps, live_optimizer

NAN = math.nan
# Candidate gradients a, b, c, d against the validation gradient (1, 1): first-order gains
# <g, g_val> = 2.0, 2.2, 1.5, -1.0. b and a point the same way (<a, b> = 4.0), c is nearly
# orthogonal to b (<b, c> = 0.3).
POOL = torch.tensor([[2.0, 0.0], [2.0, 0.2], [0.0, 1.5], [-1.0, 0.0]])
G_VAL = torch.tensor([1.0, 1.0])


def test_greedy_gain_by_hand() -> None:
    # eta 0.5. Pick b (2.2). Gains minus eta <b, .>: a 2.0 - 0.5 * 4.0 = 0.0, c 1.5 - 0.5 * 0.3 = 1.35,
    # d -1.0 - 0.5 * (-2.0) = 0.0. Pick c: the near-duplicate a of b loses its place.
    assert greedy_selection(POOL, G_VAL, 0.5, 2).tolist() == [1, 2]
    # eta 0.1: a 2.0 - 0.4 = 1.6 > c 1.5 - 0.03 = 1.47: a still comes second.
    assert greedy_selection(POOL, G_VAL, 0.1, 2).tolist() == [1, 0]
    # eta 0: first order only, the gradient-alignment ranking.
    assert greedy_selection(POOL, G_VAL, 0.0, 4).tolist() == [1, 0, 2, 3]


def test_the_authors_scaling_picks_the_same() -> None:
    """The released code ranks eta <g, g_val> - eta^2 sum <g, g_S>; dividing by eta changes no pick."""
    eta, k = 0.5, 3
    gains = eta * (POOL @ G_VAL)
    interaction = eta**2 * (POOL @ POOL.T)
    picked = []
    for _ in range(k):
        best = int(torch.argmax(gains))
        picked.append(best)
        gains = gains - interaction[best]
        gains[best] = -torch.inf
    assert greedy_selection(POOL, G_VAL, eta, k).tolist() == picked == [1, 2, 0]


def test_ties_go_to_the_lower_position_and_non_finite_rows_are_never_picked() -> None:
    pool = torch.tensor([[1.0, 0.0], [NAN, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert greedy_selection(pool, torch.tensor([1.0, 1.0]), 0.0, 4).tolist() == [0, 2, 3]
    # with eta > 0 the NaN row must not turn the others' gains NaN (0 is subtracted for it)
    assert greedy_selection(pool, torch.tensor([1.0, 1.0]), 0.5, 2).tolist() == [0, 3]


def greats(**params: object) -> GreatsSelector:
    return GreatsSelector(parse_dataclass(GreatsParams, params, "datasteer.params"))


def test_selects_with_the_mean_target_gradient_and_the_live_learning_rate() -> None:
    # Two target sets; their rows' mean is (1, 1). Pool of 4 = n_B (2 / 0.5): scored whole.
    targets = [FakeOps(gradients=torch.tensor([[2.0, 0.0]]), name="x"), FakeOps(gradients=torch.tensor([[0.0, 2.0]]))]
    ops = FakeOps(gradients=POOL, targets=targets, optimizer=live_optimizer())  # SGD at lr 0.1
    selector = greats()
    chosen = selector.select(select_context(ops=ops, num_samples=2))
    assert chosen.tolist() == [1, 0]  # eta 0.1, see test_greedy_gain_by_hand
    assert selector.report() == {"nonfinite": 0, "targets": 2}
    (call,) = ops.calls_to("gradient_features")
    assert call.indices == [0, 1, 2, 3] and call.options["optimizer"] is None  # plain gradients
    assert call.options["config"].normalize is False  # inner products, not cosines
    assert greats(learning_rate=0.5).select(select_context(ops=ops, num_samples=2)).tolist() == [1, 2]


def test_a_random_subset_of_target_rows_makes_the_validation_gradient() -> None:
    target = FakeOps(gradients=torch.arange(20.0).reshape(10, 2), name="t")
    ops = FakeOps(gradients=torch.zeros(6, 2), targets=[target], optimizer=live_optimizer())
    selector = greats(targets=3)
    selector.select(select_context(ops=ops, num_samples=2, update=0))
    selector.select(select_context(ops=ops, num_samples=2, update=1))
    first, second = (c.indices for c in target.calls_to("gradient_features"))
    assert len(first) == len(second) == 3 and first != second  # fresh per update
    assert selector.report()["targets"] == 3


def test_candidates_are_slices_of_passes_over_the_pool() -> None:
    ops = FakeOps(
        gradients=torch.randn(10, 3, generator=torch.Generator().manual_seed(0)),
        targets=[FakeOps(gradients=torch.ones(1, 3))],
        optimizer=live_optimizer(),
    )
    selector = greats(fraction=0.5)
    picked = [selector.select(select_context(ops=ops, num_samples=2, update=u)) for u in range(3)]
    batches = [c.indices for c in ops.calls_to("gradient_features")]
    assert [len(b) for b in batches] == [4, 4, 4] and not set(batches[0]) & set(batches[1])
    assert set(range(10)) - set(batches[0]) - set(batches[1]) <= set(batches[2])
    assert all(set(p.tolist()) <= set(b) for p, b in zip(picked, batches, strict=True))


def test_non_finite_rows_are_left_out_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    pool = torch.tensor([[2.0, 0.0], [NAN, 1.0], [0.0, 1.5], [1.0, 1.0]])
    target = FakeOps(gradients=torch.tensor([[2.0, 2.0], [NAN, 0.0]]))
    ops = FakeOps(gradients=pool, targets=[target], optimizer=live_optimizer())
    selector = greats()
    with caplog.at_level(logging.WARNING):
        chosen = selector.select(select_context(ops=ops, num_samples=2))
    # g_val = (2, 2): gains 4, -, 3, 4 -> a (position 0) first, then d 4 - 0.1 * 2 = 3.8 over c 3 - 0 = 3
    assert chosen.tolist() == [0, 3] and selector.report() == {"nonfinite": 2, "targets": 1}
    with caplog.at_level(logging.WARNING):
        fewer = greats(fraction=0.2).select(select_context(ops=ops, num_samples=4))  # n_B = 20 >= 4: the pool
    assert fewer.tolist() == [0, 3, 2] and "only 3 candidates have a finite gradient feature" in caplog.text


def test_without_finite_input_the_selection_in_force_stands() -> None:
    no_target = FakeOps(
        gradients=POOL, targets=[FakeOps(gradients=torch.full((2, 2), NAN))], optimizer=live_optimizer()
    )
    with pytest.raises(NonFiniteInputError, match="no finite target gradient feature"):
        greats().select(select_context(ops=no_target, num_samples=2))
    no_pool = FakeOps(gradients=torch.full((4, 2), NAN), targets=[FakeOps(gradients=G_VAL[None])], optimizer=None)
    with pytest.raises(NonFiniteInputError, match="no finite candidate gradient feature"):
        greats(learning_rate=0.1).select(select_context(ops=no_pool, num_samples=2))


def test_it_needs_targets_and_a_learning_rate() -> None:
    with pytest.raises(ConfigError, match="greats: needs target samples"):
        greats().select(select_context(ops=FakeOps(gradients=POOL), num_samples=2))
    ops = FakeOps(gradients=POOL, targets=[FakeOps(gradients=G_VAL[None])])
    with pytest.raises(ConfigError, match=r"give params\.learning_rate"):
        greats().select(select_context(ops=ops, num_samples=2))
    assert greats(learning_rate=0.5).select(select_context(ops=ops, num_samples=2)).tolist() == [1, 2]


def test_state_round_trip_continues_the_passes() -> None:
    gradients = torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    ops = FakeOps(gradients=gradients, targets=[FakeOps(gradients=torch.ones(2, 3))], optimizer=live_optimizer())
    a, b = greats(fraction=0.3), greats(fraction=0.3)  # 7 candidates: update 1 crosses the pass
    for u in range(2):
        a.select(select_context(ops=ops, num_samples=2, update=u))
    b.load_state_dict(a.state_dict())
    ctx_a, ctx_b = (select_context(ops=ops, num_samples=2, update=2) for _ in "ab")
    assert torch.equal(a.select(ctx_a), b.select(ctx_b))


def test_a_pass_over_another_pool_is_refused() -> None:
    from datasteer.errors import SteeringStateError

    targets = [FakeOps(gradients=torch.ones(1, 2))]
    a = greats(learning_rate=0.1)
    a.select(select_context(ops=FakeOps(gradients=torch.ones(10, 2), targets=targets), num_samples=2))
    b = greats(learning_rate=0.1)
    b.load_state_dict(a.state_dict())
    with pytest.raises(SteeringStateError, match="the selector's state is for a pool of 10 samples, this has 12"):
        b.select(select_context(ops=FakeOps(gradients=torch.ones(12, 2), targets=targets), num_samples=2))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"fraction": 0}, "fraction: must be in (0, 1)"),
        ({"fraction": 1}, "fraction: must be in (0, 1) (1 would keep every candidate)"),
        ({"targets": 0}, "targets: must be >= 1 or null"),
        ({"learning_rate": -1}, "learning_rate: must be >= 0 or null"),
        ({"proj_dim": 0}, "proj_dim: must be >= 1"),
        ({"method": "ghost"}, "method: 'ghost' is not allowed"),
        ({"vmap_chunk": 0}, "vmap_chunk: must be >= 1 or null"),
        ({"adam": True}, "adam: unknown key"),
    ],
)
def test_bad_params(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_dataclass(GreatsParams, raw, "datasteer.params")
    assert message in str(err.value)
