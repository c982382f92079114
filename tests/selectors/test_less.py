"""LESS: scores against a direct cosine computation, subtasks, and parameter checks."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError
from datasteer.rng import torch_generator
from datasteer.selectors.base import _warn_no_choice
from datasteer.selectors.less import LessParams, LessSelector
from tests.factories import select_context
from tests.fakes import FakeOps, live_optimizer

POOL = torch.randn(12, 5, generator=torch_generator(1, "pool"))


def fake_ops(*target_sets: torch.Tensor) -> FakeOps:
    """The pool's gradient features are POOL; each target set's are the given rows."""
    targets = [FakeOps(gradients=t) for t in target_sets]
    return FakeOps(gradients=POOL, targets=targets, optimizer=live_optimizer())


def direct_scores(targets: torch.Tensor) -> torch.Tensor:
    return (F.normalize(POOL, dim=1) @ F.normalize(targets, dim=1).T).mean(dim=1)


def test_top_k_by_mean_cosine_with_the_targets() -> None:
    targets = torch.randn(3, 5, generator=torch_generator(2, "targets"))
    ops = fake_ops(targets)
    chosen = LessSelector(LessParams()).select(select_context(ops=ops, num_samples=4))
    assert chosen.tolist() == torch.topk(direct_scores(targets), 4).indices.tolist()
    (call,) = ops.calls_to("gradient_feature_store")
    assert call.options["optimizer"] is ops.optimizer  # candidates use the Adam-aware features


def test_the_best_subtask_counts() -> None:
    a = torch.randn(2, 5, generator=torch_generator(3, "a"))
    b = torch.randn(4, 5, generator=torch_generator(4, "b"))
    chosen = LessSelector(LessParams(adam=False)).select(select_context(ops=fake_ops(a, b), num_samples=5))
    best = torch.maximum(direct_scores(a), direct_scores(b))
    assert chosen.tolist() == torch.topk(best, 5).indices.tolist()


def test_candidates_subset_and_no_targets() -> None:
    ops = fake_ops(torch.randn(2, 5, generator=torch_generator(5, "t")))
    chosen = LessSelector(LessParams(candidates=6, adam=False)).select(select_context(ops=ops, num_samples=3))
    (call,) = ops.calls_to("gradient_feature_store")
    assert len(call.indices) == 6 and set(chosen.tolist()) <= set(call.indices) and call.options["optimizer"] is None
    with pytest.raises(ConfigError, match="evaluation set"):
        LessSelector(LessParams()).select(select_context(ops=fake_ops(), num_samples=3))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"proj_dim": 0}, "proj_dim: must be >= 1"),
        ({"method": "fast"}, "method: 'fast' is not allowed"),
        ({"method": "logra"}, "cannot apply Adam"),
        ({"candidates": 0}, "candidates: must be >= 1"),
    ],
)
def test_bad_params(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_dataclass(LessParams, raw, "datasteer.params")
    assert message in str(err.value)


def test_feature_rows_that_are_not_finite_are_left_out_of_the_scoring() -> None:
    from datasteer.errors import NonFiniteInputError

    nan, inf = float("nan"), float("inf")
    pool = POOL.clone()
    pool[[2, 7]] = torch.tensor([nan, inf, 0.0, 0.0, 0.0])  # e.g. the gradient of an overflowed loss
    targets = torch.randn(3, 5, generator=torch_generator(2, "targets"))
    broken = torch.cat([targets, torch.full((1, 5), nan)])  # a NaN target would make every score NaN
    ops = FakeOps(gradients=pool, targets=[FakeOps(gradients=broken)], optimizer=live_optimizer())
    selector = LessSelector(LessParams())
    chosen = selector.select(select_context(ops=ops, num_samples=12))
    scores = direct_scores(targets)
    scores[[2, 7]] = -float("inf")
    assert chosen.tolist() == torch.topk(scores, 10).indices.tolist()  # only the 10 finite rows
    assert selector.report() == {"nonfinite": 3}
    nothing = FakeOps(gradients=torch.full((12, 5), inf), targets=[FakeOps(gradients=targets)])
    with pytest.raises(NonFiniteInputError, match="no finite gradient feature"):
        LessSelector(LessParams(adam=False)).select(select_context(ops=nothing, num_samples=3))


def test_a_selection_that_keeps_every_candidate_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """Keeping the best 6 of 6 candidates is no choice at all (it once passed silently)."""
    _warn_no_choice.cache_clear()
    ops = fake_ops(POOL[:3])
    selector = LessSelector(LessParams(candidates=6, adam=False))
    with caplog.at_level(logging.WARNING, logger="datasteer.selectors.base"):
        selector.select(select_context(ops=ops, num_samples=5))
        assert not caplog.records
        chosen = selector.select(select_context(ops=ops, num_samples=6))
    assert len(chosen) == 6
    assert "keeps the best 6 of only 6 candidates" in caplog.text
    assert "raise `candidates` above it" in caplog.text


def test_scores_from_a_feature_store_equal_the_in_memory_scores(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from datasteer.ops.feature_store import FeatureStore
    from datasteer.selectors.less import finite_scores, top_finite

    pool = torch.randn(50, 5, generator=torch_generator(6, "pool"))
    pool[[3, 40]] = float("nan")
    targets = [
        torch.randn(3, 5, generator=torch_generator(7, "t")),
        torch.randn(2, 5, generator=torch_generator(8, "t")),
    ]
    want, want_left_out = finite_scores(pool, targets)
    # Row by row the same arithmetic; BLAS may pick another kernel for another chunk shape,
    # so the scores agree to the last float bits and the selection is the same.
    for rows_per_chunk in (4, 7, 25, 50):
        with FeatureStore.from_tensor(pool, directory=tmp_path, chunk_bytes=rows_per_chunk * 5 * 4) as store:
            got, left_out = finite_scores(store, targets)
        assert got is not None and want is not None and left_out == want_left_out == 2
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert torch.equal(top_finite(got, 20), top_finite(want, 20))
