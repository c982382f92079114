"""Non-finite numbers never enter a decision: the drivers leave them out, count them, and keep
the previous decision when nothing finite is left (driven through the controller, no Trainer)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from datasteer.config import doc, load_steering
from datasteer.controller import SteeringController, digest
from datasteer.drivers import TrainedBatch
from datasteer.errors import NonFiniteInputError
from datasteer.mixers.base import DomainStats, MixContext, Mixer, ObservesSteps
from datasteer.plan import build_plan
from datasteer.registry import MIXERS, SELECTORS
from datasteer.selectors.base import SelectContext, Selector
from datasteer.weighters.loss import LossWeighter, LossWeightParams
from tests.factories import weight_context

NAMES = ("a", "b", "c")
DOMAINS = np.array([0] * 10 + [1] * 6 + [2] * 8)  # 24 samples
B = 4
NAN, INF = float("nan"), float("inf")


def make(block: dict[str, Any]) -> SteeringController:
    plan = build_plan(load_steering(block))
    return SteeringController(plan, domains=DOMAINS, domain_names=NAMES, global_batch=B, seed=5, lag=1)


def observe(ctrl: SteeringController, indices: list[int], losses: list[float], **extra: list[float]) -> TrainedBatch:
    """One micro-batch with these per-sample losses (2 tokens each unless given)."""
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in extra.items()}
    tokens = tensors.pop("tokens", torch.full((len(indices),), 2.0))
    return ctrl.observe(torch.tensor(indices), torch.tensor(losses), tokens, **tensors)


@dataclass
class NoParams:
    """Which domain to fail on (selector)."""

    fail_domain: int = doc("Domain whose selections raise from update 1 on (-1: every domain).", default=-1)


class StatsMixer(Mixer, ObservesSteps):
    """Test-only: records the statistics it observes; uniform proportions."""

    Params = NoParams

    def __init__(self, params: NoParams) -> None:
        super().__init__(params)
        self.seen: list[DomainStats] = []

    def observe(self, stats: DomainStats) -> None:
        self.seen.append(stats)

    def update(self, ctx: MixContext) -> torch.Tensor:
        return torch.full((3,), 1 / 3, dtype=torch.float64)


class FailingSelector(Selector):
    """Test-only: the first samples at update 0; no finite score from update 1 on."""

    Params = NoParams

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if ctx.update >= 1 and self.params.fail_domain in (-1, int(ctx.domains[0])):
            raise NonFiniteInputError("every score is NaN")
        return torch.arange(min(ctx.num_samples, ctx.pool_size))


@pytest.fixture
def test_algorithms() -> Iterator[None]:
    MIXERS.register("_test_stats")(StatsMixer)
    SELECTORS.register("_test_failing")(FailingSelector)
    try:
        yield
    finally:
        MIXERS._specs.pop("_test_stats", None)
        SELECTORS._specs.pop("_test_failing", None)


# -- mix -------------------------------------------------------------------------------------------


def test_a_mixer_never_sees_a_nan_loss_and_the_record_counts_it(test_algorithms: None) -> None:
    ctrl = make({"paradigm": "mix", "algorithm": "_test_stats"})
    ctrl.begin(4)
    # samples 0 (a), 10 (b), 16 and 17 (c): b's loss is NaN, one of c's is infinite
    observe(ctrl, [0, 10, 16, 17], [1.0, NAN, 2.0, INF])
    observe(ctrl, [1], [3.0], tokens=[NAN])  # a non-finite token count is left out too
    (event,) = ctrl.step_end(1)
    (stats,) = ctrl.drivers[0].algorithm.seen
    assert stats.samples.tolist() == [1, 0, 1] and stats.loss_sum.tolist() == [1.0, 0.0, 2.0]
    assert stats.token_loss_sum.tolist() == [2.0, 0.0, 4.0]
    assert event["nonfinite"] == 3
    assert all(math.isfinite(v) for v in event["proportions"].values())


def test_after_steps_without_a_finite_loss_odm_keeps_its_proportions(caplog: pytest.LogCaptureFixture) -> None:
    """The issue's case: NaN losses became reward 0 and moved the proportions; now they stand."""
    ctrl = make({"paradigm": "mix", "algorithm": "odm"})
    ctrl.begin(8)
    for step in (1, 2):  # (ODM's exploration keeps the proportions uniform until step 4)
        observe(ctrl, [step, 10 + step, 16 + step, 17 + step], [1.0, 5.0, 2.0, 2.0])
        (first,) = ctrl.step_end(step)  # the update for step 2 + step
    odm = ctrl.drivers[0].algorithm
    estimates = odm.estimates.clone()
    observe(ctrl, [3, 13, 19, 20], [NAN, NAN, INF, NAN])
    with caplog.at_level(logging.WARNING):
        (second,) = ctrl.step_end(3)
    assert "every loss of step 3 is NaN or infinite" in caplog.text
    assert second["kept"] is True and second["nonfinite"] == 4
    assert second["proportions"] == first["proportions"]  # the proportions in force stand
    assert first["proportions"] != {n: round(1 / 3, 8) for n in NAMES}
    assert torch.equal(odm.estimates, estimates) and odm.steps_observed == 2
    observe(ctrl, [4, 14, 21, 22], [1.0, 5.0, 2.0, NAN])  # finite again: learning resumes
    (third,) = ctrl.step_end(4)
    assert "kept" not in third and third["nonfinite"] == 1 and odm.steps_observed == 3


def test_doremi_alpha_and_its_loss_weights_stay_finite() -> None:
    """The issue's case: alpha turned NaN and the proxy trained on a NaN-weighted loss."""
    ctrl = make({"paradigm": "mix", "algorithm": "doremi", "params": {"reference_model": "unused"}})
    ctrl.begin(4)
    observe(ctrl, [0, 10, 16], [2.0, 3.0, 1.0], excess=[1.0, 2.0, 0.5])
    ctrl.step_end(1)
    doremi = ctrl.drivers[0].algorithm
    alpha = doremi.alpha.clone()
    batch = observe(ctrl, [1, 11, 17], [NAN, 3.0, 1.0], excess=[NAN, 2.0, 0.5])
    weights = ctrl.sample_weights(2, batch)
    assert weights[0] == 0 and bool((weights[1:] > 0).all())
    observe(ctrl, [2], [INF], excess=[INF])
    (event,) = ctrl.step_end(2)
    assert event["nonfinite"] == 2 and torch.isfinite(doremi.alpha).all() and not torch.equal(doremi.alpha, alpha)
    observe(ctrl, [3, 12], [NAN, NAN], excess=[1.0, 1.0])
    ctrl.step_end(3)  # nothing finite: alpha stands, and the step is not in the mean
    assert doremi.steps_observed == 2 and torch.isfinite(doremi.learned_proportions()).all()
    assert ctrl.learned_proportions() is not None


def test_a_micro_batch_without_a_finite_loss_keeps_its_nan_for_the_divergence_check() -> None:
    ctrl = make({"paradigm": "mix", "algorithm": "doremi", "params": {"reference_model": "unused"}})
    ctrl.begin(4)
    batch = observe(ctrl, [0, 10], [NAN, NAN], excess=[NAN, NAN])
    assert bool((ctrl.sample_weights(1, batch) > 0).all())


# -- weight ----------------------------------------------------------------------------------------


def test_a_weighter_weighs_only_the_finite_samples() -> None:
    ctrl = make({"paradigm": "weight", "algorithm": "loss"})
    ctrl.begin(3)
    losses = torch.tensor([1.0, NAN, 3.0, INF, 2.0])
    batch = observe(ctrl, [0, 1, 10, 11, 16], losses.tolist())
    weights = ctrl.sample_weights(1, batch)
    expected = LossWeighter(LossWeightParams()).weigh(weight_context(torch.tensor([1.0, 3.0, 2.0])))
    torch.testing.assert_close(weights[[0, 2, 4]], expected.float())
    assert weights[1] == weights[3] == 0
    # the weighted loss of the mixin, (1/b) sum w l over the kept samples, is finite
    assert math.isfinite(float((weights * torch.where(weights > 0, losses, 0.0)).sum()))
    (event,) = ctrl.step_end(1)
    assert event["nonfinite"] == 2 and event["weight_min"] == 0.0


def test_a_weighter_left_without_finite_samples_gives_weight_one(caplog: pytest.LogCaptureFixture) -> None:
    ctrl = make({"paradigm": "weight", "algorithm": "loss"})
    ctrl.begin(3)
    batch = observe(ctrl, [0, 1], [NAN, INF])
    with caplog.at_level(logging.WARNING):
        weights = ctrl.sample_weights(1, batch)
    assert weights.tolist() == [1.0, 1.0] and "trains with weight 1" in caplog.text
    (event,) = ctrl.step_end(1)
    assert event["nonfinite"] == 2


def test_a_reference_loss_that_is_not_finite_leaves_its_sample_out() -> None:
    ctrl = make({"paradigm": "weight", "algorithm": "reducible", "params": {"reference_model": "unused"}})
    ctrl.begin(3)
    batch = observe(ctrl, [0, 1, 2], [1.0, 2.0, 3.0], reference_losses=[0.5, NAN, 1.0])
    weights = ctrl.sample_weights(1, batch)
    assert weights[1] == 0 and torch.isfinite(weights).all() and bool((weights[[0, 2]] > 0).all())


# -- select ----------------------------------------------------------------------------------------


def test_a_selection_without_finite_scores_keeps_the_one_in_force(
    test_algorithms: None, caplog: pytest.LogCaptureFixture
) -> None:
    ctrl = make({"paradigm": "select", "algorithm": "_test_failing", "update_every": 2})
    assert ctrl.sampler is not None
    (first,) = ctrl.begin(6)
    served_before = ctrl.sampler.indices_for_step(2)
    with caplog.at_level(logging.WARNING):
        (second,) = ctrl.step_end(1)  # update 1, for steps 3-4
    assert "the selection in force is kept" in caplog.text
    assert second["kept"] is True
    assert (second["digest"], second["selected"]) == (first["digest"], first["selected"])
    # the same selection goes on being served, in its own order (steps 3-4 continue steps 1-2)
    assert set(ctrl.sampler.indices_for_step(3)) <= set(range(first["selected"]))
    assert set(served_before) <= set(range(first["selected"]))


def test_under_a_mixer_only_the_failing_domain_keeps_its_part(test_algorithms: None) -> None:
    block = {"mix": {"algorithm": "static"}, "select": {"algorithm": "_test_failing", "update_every": 2}}
    block["select"]["params"] = {"fail_domain": 1}
    ctrl = make(block)
    ctrl.begin(6)
    sampler = ctrl.sampler
    before = sampler.selection_at(1)  # type: ignore[union-attr]
    (event,) = [e for e in ctrl.step_end(1) if e["paradigm"] == "select"]  # update 1, for steps 3-4
    after = sampler.selection_at(3)  # type: ignore[union-attr]
    assert event["kept"] is True and digest(after) == event["digest"]
    b = DOMAINS == 1
    assert sorted(after[b[after]]) == sorted(before[b[before]])  # b: the selection in force
    assert len(after[~b[after]]) > 0  # a and c: selected anew
