"""Aioli's LearnParams estimates and exponentiated-gradient steps against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.mixers.aioli import (
    AioliMixer,
    AioliParams,
    exponentiated_step,
    normalize_mixing_law,
    perturbed_mixtures,
)
from datasteer.mixers.base import DomainStats
from datasteer.ops.protocol import NO_MODEL
from datasteer.rng import torch_generator
from tests.factories import mix_context
from tests.fakes import FakeOps

NAMES = ("a", "b")


def _t(values: list[float] | list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def stats(step: int, samples: list[float], losses: list[float]) -> DomainStats:
    """One step: ``samples`` of each domain, each with mean loss ``losses``."""
    n, loss = _t(samples), _t(losses)
    return DomainStats(step, n / n.sum(), n, n * loss, n * 10, n * loss * 10)


def ctx(step: int, first: int | None = None, update: int = 0, ops=NO_MODEL, k: int = 2, max_steps: int = 100):
    """The update decided after ``step`` for step ``first`` (lag 1 by default), one step long."""
    first = step + 2 if first is None else first
    names = NAMES if k == 2 else None
    return mix_context(
        k=k, names=names, step=step, first_step=first, last_step=first, update=update, ops=ops, max_steps=max_steps
    )


def close(got: torch.Tensor | None, expected: list[list[float]]) -> None:
    assert got is not None
    torch.testing.assert_close(got, _t(expected), rtol=1e-9, atol=1e-12)


def softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


# -- the pieces ----------------------------------------------------------------------------------


def test_perturbed_mixtures_put_the_factor_on_one_domain_and_share_the_rest() -> None:
    assert perturbed_mixtures(3, 0.5).tolist() == [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]
    assert perturbed_mixtures(2, 1.0).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_normalize_shifts_a_negative_minimum_then_divides_by_the_sum() -> None:
    # min -0.1: [[0.3, 0], [0.1, 0.4]], sum 0.8
    got = normalize_mixing_law(_t([[0.2, -0.1], [0.0, 0.3]]))
    close(got, [[0.375, 0.0], [0.125, 0.5]])
    # non-negative: no shift, [[1, 2], [3, 4]] / 10
    close(normalize_mixing_law(_t([[1, 2], [3, 4]])), [[0.1, 0.2], [0.3, 0.4]])
    assert normalize_mixing_law(_t([[0.5, 0.5], [0.5, 0.5]]) - 0.5).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_exponentiated_step_multiplies_by_exp_of_eta_times_column_sums() -> None:
    # 1^T A = [0.2, 0.5, 0.3]; p_j exp(2 c_j) = 0.5 e^0.4, 0.3 e^1.0, 0.2 e^0.6, normalised
    a = _t([[0.1, 0.4, 0.0], [0.1, 0.1, 0.3]])
    raw = [0.5 * math.exp(0.4), 0.3 * math.exp(1.0), 0.2 * math.exp(0.6)]
    got = exponentiated_step(torch.log(_t([0.5, 0.3, 0.2])), a, eta=2.0)
    assert got.tolist() == pytest.approx([v / sum(raw) for v in raw])


# -- LearnParams from held-out losses: the paper's Algorithm 2 ------------------------------------


def held_out(values: list[list[float]]) -> list[FakeOps]:
    """Eval sets ``a_eval`` and ``b_eval`` of 2 rows each; call c's rows average ``values[c][d]``."""
    return [
        FakeOps(losses=[_t([v[d] - 0.1, v[d] + 0.1]) for v in values], name=f"{name}_eval")
        for d, name in enumerate(NAMES)
    ]


PAPER = AioliParams(
    eta=1.0, round_steps=4, interval_steps=1, sweeps=1, one_hot_factor=0.75, source="eval", samples_per_domain=2
)


def test_eval_source_is_the_papers_learnparams_and_update() -> None:
    # held-out losses (a, b) after steps 0, 1, 2: the boundaries of round 0's two intervals
    targets = held_out([[4.0, 5.0], [3.8, 4.2], [3.2, 4.1]])
    ops = FakeOps(targets=targets)
    mixer = AioliMixer(PAPER)
    mixer.orders[0] = torch.tensor([[1, 0]])  # this sweep perturbs b (step 1), then a (step 2)
    # lag 1: update u shapes step u + 1 and is decided after step u - 1 (train begin for u <= 1)
    assert mixer.update(ctx(0, first=1, ops=ops)).tolist() == [0.25, 0.75]  # W_b
    assert mixer.update(ctx(0, first=2, update=1, ops=ops)).tolist() == [0.75, 0.25]  # W_a
    assert mixer.update(ctx(1, update=2, ops=ops)).tolist() == [0.5, 0.5]  # step 3: A needs step 2's interval
    got = mixer.update(ctx(2, update=3, ops=ops))
    # beta[:, b] = L(0) - L(1) = [0.2, 0.8]; beta[:, a] = L(1) - L(2) = [0.6, 0.1]; one sweep
    # A = beta W^-1, W^-1 = [[1.5, -0.5], [-0.5, 1.5]]:
    #   A_a = [0.6 * 1.5 - 0.2 * 0.5, -0.6 * 0.5 + 0.2 * 1.5] = [0.8, 0.0]
    #   A_b = [0.1 * 1.5 - 0.8 * 0.5, -0.1 * 0.5 + 0.8 * 1.5] = [-0.25, 1.15]   (A_b . W_b = 0.8 = beta_bb)
    # normalised: + 0.25 -> [[1.05, 0.25], [0, 1.4]], / 2.7; 1^T A = [1.05, 1.65] / 2.7
    expected = softmax([math.log(0.5) + 1.05 / 2.7, math.log(0.5) + 1.65 / 2.7])
    assert got.tolist() == pytest.approx(expected)
    assert expected == pytest.approx([0.444672, 0.555328], abs=1e-6)
    close(mixer.last_a, [[1.05 / 2.7, 0.25 / 2.7], [0.0, 1.4 / 2.7]])
    # each boundary evaluated once, on the first samples_per_domain rows
    assert [c.indices for c in targets[0].calls] == [[0, 1]] * 3
    # round 1 (steps 5-8) starts from a fresh boundary: the loss after step 4
    assert mixer.learn == {"round": 1, "losses": [], "next": 4}
    report = mixer.report()
    assert report["mixture"].tolist() == pytest.approx(expected) and report["round"] == 0.0
    assert report["gain"].tolist() == pytest.approx([1.05 / 2.7, 1.65 / 2.7])


def test_sweeps_average_the_loss_drops_of_each_mixture() -> None:
    params = AioliParams(**{**PAPER.__dict__, "sweeps": 2, "round_steps": 6, "one_hot_factor": 1.0})
    mixer = AioliMixer(params)
    mixer.orders[0] = torch.tensor([[0, 1], [1, 0]])  # a, b, b, a
    losses = [[4.0, 5.0], [3.0, 4.9], [2.9, 4.5], [2.8, 4.3], [2.4, 4.2]]
    ops = FakeOps(targets=held_out(losses))
    for u, step in enumerate([0, 0, 1, 2, 3]):
        mixer.update(ctx(step, first=u + 1, update=u, ops=ops))
    # one-hot (W = I): A = beta; column a: drops of intervals 1 and 4, column b: intervals 2 and 3
    #   beta_a = ([1.0, 0.1] + [0.4, 0.1]) / 2 = [0.7, 0.1]; beta_b = ([0.1, 0.4] + [0.1, 0.2]) / 2 = [0.1, 0.3]
    # normalised by the sum 1.2 -> 1^T A = [0.8, 0.4] / 1.2
    got = mixer.update(ctx(4, first=6, update=5, ops=ops))
    assert got.tolist() == pytest.approx(softmax([0.8 / 1.2, 0.4 / 1.2]))


def test_a_missed_boundary_is_an_error() -> None:
    mixer = AioliMixer(PAPER)
    ops = FakeOps(targets=held_out([[4.0, 5.0]]))
    mixer.update(ctx(0, first=1, ops=ops))
    with pytest.raises(SteeringStateError, match="after step 1 were never measured"):
        mixer.update(ctx(2, update=1, ops=ops))


def test_eval_source_needs_an_eval_set_per_domain() -> None:
    ops = FakeOps(targets=[FakeOps(losses=torch.ones(2), name="a_eval")])
    with pytest.raises(ConfigError, match=r"source: 'eval' needs an evaluation set named like each domain"):
        AioliMixer(PAPER).update(ctx(0, first=1, ops=ops))
    auto = AioliMixer(AioliParams(**{**PAPER.__dict__, "source": "auto"}))
    assert auto.needs_model
    auto.update(ctx(0, first=1, ops=ops))
    assert auto.source_used == "train" and not auto.needs_model  # no ops are built from now on
    assert not AioliMixer(AioliParams(source="train")).needs_model


# -- LearnParams from training losses ------------------------------------------------------------

TRAIN = AioliParams(eta=1.0, round_steps=6, interval_steps=1, sweeps=2, one_hot_factor=0.75, source="train")
#: Round 0's LearnParams steps 1-4 on W_a, W_b, W_b, W_a, batches of 4: realised shares 3:1, 1:3, 1:3, 3:1.
SAMPLES = [[3, 1], [1, 3], [1, 3], [3, 1]]


def train_round(losses: list[list[float]], params: AioliParams = TRAIN) -> AioliMixer:
    """Round 0's LearnParams steps, observed and followed by their updates as the driver runs them."""
    mixer = AioliMixer(params)
    mixer.orders[0] = torch.tensor([[0, 1], [1, 0]])  # steps 1-4 on W_a, W_b, W_b, W_a
    mixer.update(ctx(0, first=1))
    mixer.update(ctx(0, first=2, update=1))
    for step, (samples, loss) in enumerate(zip(SAMPLES, losses, strict=True), start=1):
        mixer.observe(stats(step, samples, loss))
        if step < 4:
            mixer.update(ctx(step, update=step + 1))
    return mixer


def test_train_source_recovers_the_law_from_losses_that_follow_it() -> None:
    # x(s) = realised shares of the earlier LearnParams steps: (0, 0), (.75, .25), (1, 1), (1.25, 1.75);
    # losses l_i(s) = c_i - A_i . x(s) with c = (5, 6), A = [[0.4, 0.1], [0.2, 0.6]]:
    #   a: 5, 5 - 0.3 - 0.025 = 4.675, 5 - 0.4 - 0.1 = 4.5, 5 - 0.5 - 0.175 = 4.325
    #   b: 6, 6 - 0.15 - 0.15 = 5.7,   6 - 0.2 - 0.6 = 5.2, 6 - 0.25 - 1.05 = 4.7
    mixer = train_round([[5.0, 6.0], [4.675, 5.7], [4.5, 5.2], [4.325, 4.7]])
    assert mixer.learn["x"].tolist() == pytest.approx([2.0, 2.0])
    got = mixer.update(ctx(4, update=5))  # after the last LearnParams step
    # A >= 0: no shift; / 1.3 -> 1^T A = [0.6, 0.7] / 1.3; p = softmax(log 0.5 + that)
    close(mixer.last_a, [[0.4 / 1.3, 0.1 / 1.3], [0.2 / 1.3, 0.6 / 1.3]])
    assert got.tolist() == pytest.approx(softmax([0.6 / 1.3, 0.7 / 1.3]))
    assert got.tolist() == pytest.approx([0.480779, 0.519221], abs=1e-6)


def test_train_source_is_least_squares_over_every_sample() -> None:
    losses = [[5.0, 6.1], [4.5, 5.9], [4.7, 5.0], [4.2, 4.9]]
    mixer = AioliMixer(AioliParams(**{**TRAIN.__dict__, "normalize": False}))
    mixer.orders[0] = torch.tensor([[0, 1], [1, 0]])
    mixer.update(ctx(0, first=1))
    rows: dict[int, list[tuple[list[float], float]]] = {0: [], 1: []}
    x = [0.0, 0.0]
    for step, (samples, loss) in enumerate(zip(SAMPLES, losses, strict=True), start=1):
        mixer.observe(stats(step, samples, loss))
        for d in (0, 1):  # one row per sample: (1, -x), its loss
            rows[d] += [([1.0, -x[0], -x[1]], loss[d])] * samples[d]
        x = [x[0] + samples[0] / 4, x[1] + samples[1] / 4]
    mixer.update(ctx(4, update=4))
    for d in (0, 1):
        design, target = _t([r[0] for r in rows[d]]), _t([[r[1]] for r in rows[d]])
        solution = torch.linalg.lstsq(design, target).solution[1:, 0]
        assert mixer.last_a[d].tolist() == pytest.approx(solution.tolist())


def test_a_step_that_was_not_observed_still_moves_x_by_its_planned_mixture() -> None:
    mixer = AioliMixer(TRAIN)
    mixer.orders[0] = torch.tensor([[0, 1], [1, 0]])
    mixer.update(ctx(0, first=1))
    mixer.observe(stats(1, [3, 1], [5.0, 6.0]))
    mixer.observe(stats(3, [1, 3], [4.5, 5.2]))  # step 2 (W_b) had no finite loss
    assert mixer.learn["x"].tolist() == pytest.approx([0.75 + 0.25 + 0.25, 0.25 + 0.75 + 0.75])


def test_the_plan_of_a_round_and_p_after_it() -> None:
    mixer = AioliMixer(TRAIN)
    plan = [mixer.update(ctx(s - 2 if s > 1 else 0, first=s, update=s - 1)).tolist() for s in range(1, 13)]
    w = perturbed_mixtures(2, 0.75).tolist()
    order0, order1 = mixer.orders[0].flatten().tolist(), mixer.orders[1].flatten().tolist()
    # each sweep's order is a permutation drawn from the generator of the update that plans the round
    generator = torch_generator(0, "mix", 0)
    assert mixer.orders[0].tolist() == [torch.randperm(2, generator=generator).tolist() for _ in range(2)]
    assert plan[:4] == [w[d] for d in order0]  # steps 1-4: LearnParams
    assert plan[4:6] == [[0.5, 0.5]] * 2  # no losses observed: A = 0, p unchanged
    assert plan[6:10] == [w[d] for d in order1]  # round 1
    assert sorted(order0[:2]) == sorted(order0[2:]) == [0, 1]  # each sweep perturbs every domain once


# -- the update's variants -----------------------------------------------------------------------

A1 = _t([[0.3, 0.1], [0.0, 0.2]])  # sums to 0.6: normalised [[.5, 1/6], [0, 1/3]], 1^T A = [0.5, 0.5]
A2 = _t([[0.1, 0.0], [0.2, 0.1]])  # sums to 0.4: normalised [[.25, 0], [.5, .25]], 1^T A = [0.75, 0.25]


def started(params: AioliParams) -> AioliMixer:
    mixer = AioliMixer(params)
    mixer.update(ctx(0, first=1))
    return mixer


def test_without_ema_the_steps_accumulate_from_p0() -> None:
    mixer = started(AioliParams(eta=2.0, source="train", round_steps=20, interval_steps=1, sweeps=1))
    mixer.move(A1, 0)
    mixer.move(A2, 1)
    # p = p0 * exp(2 * ([0.5, 0.5] + [0.75, 0.25])), normalised
    assert mixer.p.tolist() == pytest.approx(softmax([2 * 1.25, 2 * 0.75]))


def test_with_ema_p_is_p0_times_exp_of_the_averaged_law() -> None:
    params = AioliParams(eta=2.0, ema=0.25, source="train", round_steps=20, interval_steps=1, sweeps=1)
    mixer = started(params)
    mixer.move(A1, 0)
    assert mixer.p.tolist() == pytest.approx(softmax([2 * 0.5, 2 * 0.5]))  # A_bar = A1
    mixer.move(A2, 1)
    # A_bar = 0.75 A2 + 0.25 A1: 1^T A_bar = 0.75 [0.75, 0.25] + 0.25 [0.5, 0.5] = [0.6875, 0.3125]
    assert mixer.a_bar.sum(dim=0).tolist() == pytest.approx([0.6875, 0.3125])
    assert mixer.p.tolist() == pytest.approx(softmax([2 * 0.6875, 2 * 0.3125]))


def test_a_prior_is_the_start_and_unnormalised_laws_are_used_as_they_are() -> None:
    params = AioliParams(eta=1.0, normalize=False, proportions=[0.7, 0.3], source="train", round_steps=20)
    mixer = started(params)
    assert mixer.p0.tolist() == [0.7, 0.3]
    mixer.move(A1, 0)  # 1^T A = [0.3, 0.3]: p unchanged
    assert mixer.p.tolist() == pytest.approx([0.7, 0.3])
    mixer.move(_t([[0.0, 0.0], [0.0, math.log(3.0)]]), 1)
    assert mixer.p.tolist() == pytest.approx([0.7 / 1.6, 0.9 / 1.6])  # 0.3 * 3 = 0.9


def test_a_law_that_is_not_finite_leaves_p() -> None:
    mixer = started(AioliParams(source="train", round_steps=20, interval_steps=1, sweeps=1))
    mixer.move(_t([[math.nan, 0.0], [0.0, 1.0]]), 0)
    assert mixer.p.tolist() == [0.5, 0.5] and mixer.applied == 0


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"eta": 0}, "eta: must be > 0"),
        ({"round_steps": 0}, "round_steps: must be >= 1"),
        ({"interval_steps": 0}, "interval_steps: must be >= 1"),
        ({"sweeps": 0}, "sweeps: must be >= 1"),
        ({"one_hot_factor": 1.5}, r"one_hot_factor: must be in \(0, 1\]"),
        ({"ema": 1.0}, r"ema: must be in \[0, 1\) or null"),
        ({"source": "held_out"}, "source: 'held_out' is not allowed; choose one of 'auto', 'eval', 'train'"),
        ({"samples_per_domain": 0}, "samples_per_domain: must be >= 1 or null"),
        ({"proportions": [0.5, 0.6]}, "proportions: proportions must sum to 1"),
    ],
)
def test_bad_params(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_dataclass(AioliParams, raw, "datasteer.params")


def test_params_that_do_not_fit_the_domains() -> None:
    with pytest.raises(ConfigError, match=r"one_hot_factor: must exceed 1/K = 1/4"):
        AioliMixer(AioliParams(one_hot_factor=0.25)).check_domains(["a", "b", "c", "d"])
    with pytest.raises(ConfigError, match=r"LearnParams takes sweeps x K x interval_steps = 64 steps; a round of 64"):
        AioliMixer(AioliParams(round_steps=64)).check_domains(["a", "b", "c", "d"])
    with pytest.raises(ConfigError, match="expected 3 proportions"):
        AioliMixer(AioliParams(proportions=[0.5, 0.5])).check_domains(["a", "b", "c"])
    AioliMixer(AioliParams()).check_domains(["a", "b", "c", "d"])  # 4 x 4 x 4 = 64 of 250 steps


def test_updates_must_come_every_step() -> None:
    with pytest.raises(ConfigError, match="update_every: aioli plans its proportions step by step"):
        AioliMixer(TRAIN).update(mix_context(k=2, first_step=1, last_step=5))
    # the last update of a run with max_updates stays in force to the end: allowed
    AioliMixer(TRAIN).update(mix_context(k=2, first_step=1, last_step=100, max_steps=100))


# -- state -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["eval", "train"])
def test_state_round_trip_mid_round_continues_identically(source: str) -> None:
    params = AioliParams(**{**PAPER.__dict__, "source": source, "ema": 0.5, "sweeps": 2, "round_steps": 6})
    losses = [[4.0, 5.0], [3.0, 4.9], [2.9, 4.5], [2.8, 4.3], [2.4, 4.2], [2.3, 4.0], [2.2, 3.9]]

    def drive(mixer: AioliMixer, steps: range, ops: FakeOps) -> list[list[float]]:
        out = []
        for step in steps:
            if step > 0:
                mixer.observe(stats(step, [3, 1] if step % 2 else [1, 3], losses[step]))
            out.append(mixer.update(ctx(step, update=step, ops=ops)).tolist())
        return out

    a = AioliMixer(params)
    drive(a, range(3), FakeOps(targets=held_out(losses)))
    b = AioliMixer(params)
    b.load_state_dict(a.state_dict())
    rest = [held_out(losses[3:]), held_out(losses[3:])]
    assert drive(a, range(3, 7), FakeOps(targets=rest[0])) == drive(b, range(3, 7), FakeOps(targets=rest[1]))
    assert a.applied == b.applied == 0 and torch.equal(a.p, b.p)
