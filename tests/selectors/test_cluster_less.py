"""Cluster-LESS: representatives, renormalised cluster features, inherited scores, fill order, state."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError
from datasteer.rng import torch_generator
from datasteer.selectors.cluster_less import (
    ClusterLessParams,
    ClusterLessSelector,
    cluster_features,
    order_by_centrality,
    pick_representatives,
    rank_by_cluster_score,
)
from tests.factories import select_context
from tests.fakes import FakeOps, live_optimizer

# Two well separated groups of unit embeddings: A = {0, 2, 4} around axis 0, B = {1, 3, 5}
# around axis 1 (cross-group cosine 0, within-group >= 0.8), so k-center with k = 2 finds them.
# Labels are compacted by first member: A = 0, B = 1.
EMB = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],  # 0 A
        [0.0, 1.0, 0.0, 0.0],  # 1 B
        [0.96, 0.0, 0.28, 0.0],  # 2 A
        [0.0, 0.96, 0.0, 0.28],  # 3 B
        [0.96, 0.0, -0.28, 0.0],  # 4 A
        [0.0, 0.8, 0.0, 0.6],  # 5 B
    ]
)
LABELS = torch.tensor([0, 1, 0, 1, 0, 1])
# Dot products with the cluster means: A mean (0.9733, 0, 0, 0): 0 -> 0.973, 2 and 4 -> 0.934
# (tie: lower index first); B mean (0, 0.92, 0, 0.2933): 1 -> 0.920, 3 -> 0.965, 5 -> 0.912.
ORDER = [0, 2, 4, 3, 1, 5]

# Gradient features of the pool (unit directions in the comments).
GRADS = torch.tensor(
    [
        [3.0, 0.0],  # 0: (1, 0)
        [0.0, -5.0],  # 1: (0, -1)
        [0.0, 2.0],  # 2: (0, 1)
        [1.0, 1.0],  # 3: (0.707, 0.707)
        [-1.0, 0.0],  # 4: (-1, 0)
        [2.0, 0.0],  # 5: (1, 0)
    ]
)
R2 = 1 / math.sqrt(2)
C22 = math.cos(math.pi / 8)  # cos 22.5 deg = 0.9239
S22 = math.sin(math.pi / 8)  # sin 22.5 deg = 0.3827


def fake_ops(*target_sets: torch.Tensor) -> FakeOps:
    """The pool's embeddings are EMB and its gradient features GRADS; each target set's
    gradient features are the given rows."""
    targets = [FakeOps(gradients=t) for t in target_sets]
    return FakeOps(embeddings=EMB, gradients=GRADS, targets=targets, optimizer=live_optimizer())


def selector(**params: Any) -> ClusterLessSelector:
    return ClusterLessSelector(ClusterLessParams(cluster_size=3, clustering="kcenter", **params))


def test_members_ordered_by_closeness_to_the_cluster_mean() -> None:
    assert order_by_centrality(EMB, LABELS).tolist() == ORDER


@pytest.mark.parametrize(
    ("pick", "count", "expected"),
    [
        ("nearest", 2, [0, 2, 3, 1]),
        ("farthest", 2, [2, 4, 1, 5]),
        ("mixed", 2, [0, 4, 3, 5]),  # ceil(2/2) nearest + floor(2/2) farthest
        ("mixed", 3, [0, 2, 4, 3, 1, 5]),  # 2 nearest + 1 farthest: the whole cluster
        ("nearest", 5, [0, 2, 4, 3, 1, 5]),  # never more than a cluster has
    ],
)
def test_representatives(pick: str, count: int, expected: list[int]) -> None:
    reps, rep_labels = pick_representatives(torch.tensor(ORDER), LABELS, count, pick, torch_generator(0))  # type: ignore[arg-type]
    assert reps.tolist() == expected
    assert rep_labels.tolist() == LABELS[reps].tolist()


def test_random_representatives_are_seeded_members() -> None:
    def draw(seed: int) -> list[int]:
        reps, _ = pick_representatives(torch.tensor(ORDER), LABELS, 2, "random", torch_generator(seed))
        return reps.tolist()

    assert draw(1) == draw(1)
    assert all(set(d[:2]) <= {0, 2, 4} and set(d[2:]) <= {1, 3, 5} and len(set(d)) == 4 for d in map(draw, range(8)))
    assert len({tuple(draw(s)) for s in range(8)}) > 1


def test_cluster_feature_is_the_renormalised_mean_of_unit_features() -> None:
    features = cluster_features(
        torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, -5.0]]), LABELS[[0, 2, 3, 1]], 2
    )
    expected = torch.tensor([[R2, R2], [C22, -S22]])  # (1,0)+(0,1) -> 45 deg; (.707,.707)+(0,-1) -> -22.5 deg
    torch.testing.assert_close(features, expected)


@pytest.mark.parametrize(
    ("pick", "targets", "expected"),
    [
        # one target (1, 0): score = x of the cluster feature
        ("nearest", [[[1.0, 0.0]]], [R2, C22]),
        ("farthest", [[[1.0, 0.0]]], [-R2, R2]),  # A: (0,1)+(-1,0); B: (0,-1)+(1,0)
        ("mixed", [[[2.0, 0.0]]], [0.0, C22]),  # A: (1,0)+(-1,0) = 0 -> feature 0; B: 45 deg + 0 deg
        # a set of two targets: the mean cosine over the set
        ("nearest", [[[1.0, 0.0], [0.0, 1.0]]], [R2, (C22 - S22) / 2]),
        # two sets: the max over sets
        ("nearest", [[[1.0, 0.0]], [[0.0, 3.0]]], [R2, C22]),
        ("farthest", [[[1.0, 0.0]], [[0.0, 3.0]]], [R2, R2]),
    ],
)
def test_cluster_scores_by_hand(pick: str, targets: list, expected: list[float]) -> None:
    ops = fake_ops(*[torch.tensor(t) for t in targets])
    scores = selector(pick=pick, representatives=2).cluster_scores(select_context(ops=ops, num_samples=4))
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-6, rtol=0)


def test_every_member_inherits_its_cluster_score_and_whole_clusters_fill_first() -> None:
    ops = fake_ops(torch.tensor([[1.0, 0.0]]))  # nearest: A 0.707 < B 0.924
    sel = selector(pick="nearest", representatives=2)
    chosen = sel.select(select_context(ops=ops, num_samples=4))
    assert sel.labels is not None and sel.labels.tolist() == LABELS.tolist()
    assert set(chosen[:3].tolist()) == {1, 3, 5} and int(chosen[3]) in {0, 2, 4}
    (call,) = ops.calls_to("gradient_features")
    assert call.indices == [0, 2, 3, 1] and call.options["optimizer"] is ops.optimizer  # 2 reps per cluster, Adam-aware
    assert selector(adam=False).select(select_context(ops=fake_ops(torch.ones(1, 2)), num_samples=2)).numel() == 2
    # asking for more than the pool returns the pool, best cluster first
    everything = selector().select(select_context(ops=fake_ops(torch.tensor([[1.0, 0.0]])), num_samples=10))
    assert set(everything[:3].tolist()) == {1, 3, 5} and sorted(everything.tolist()) == list(range(6))


def test_ties_between_clusters_go_by_label_and_members_by_a_seeded_order() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    scores = torch.tensor([0.5, 0.5, 0.9])
    order = rank_by_cluster_score(scores, labels, 7, torch_generator(0))
    assert set(order[:2].tolist()) == {2, 5}
    assert set(order[2:5].tolist()) == {0, 3, 6} and set(order[5:].tolist()) == {1, 4}
    cut = {tuple(rank_by_cluster_score(scores, labels, 4, torch_generator(s)).tolist()) for s in range(10)}
    assert all(set(c[:2]) == {2, 5} and set(c[2:]) <= {0, 3, 6} for c in cut)
    assert len(cut) > 1  # which members of the last cluster are cut depends on the seed
    assert torch.equal(
        rank_by_cluster_score(scores, labels, 4, torch_generator(3)),
        rank_by_cluster_score(scores, labels, 4, torch_generator(3)),
    )


def test_deterministic_for_a_fixed_seed() -> None:
    def run(seed: int) -> list[int]:
        ops = fake_ops(torch.tensor([[1.0, 0.0]]))
        return (
            selector(pick="random", representatives=1)
            .select(select_context(ops=ops, num_samples=4, seed=seed))
            .tolist()
        )

    assert run(5) == run(5)


def test_clusters_once_and_state_round_trip() -> None:
    ops = fake_ops(torch.tensor([[1.0, 0.0]]))
    sel = selector()
    first = sel.select(select_context(ops=ops, num_samples=4, update=0))
    second = sel.select(select_context(ops=ops, num_samples=4, update=1))
    assert len(ops.calls_to("embeddings")) == 1 and set(first[:3].tolist()) == set(second[:3].tolist()) == {1, 3, 5}
    state = sel.state_dict()
    assert state["labels"].tolist() == LABELS.tolist() and state["order"].tolist() == ORDER
    fresh = selector()
    fresh.load_state_dict(state)
    again = fresh.select(select_context(ops=ops, num_samples=4, update=1))
    assert len(ops.calls_to("embeddings")) == 1 and torch.equal(again, second)  # no re-clustering after a resume


def test_needs_targets() -> None:
    with pytest.raises(ConfigError, match="evaluation set"):
        selector().select(select_context(ops=fake_ops(), num_samples=3))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"cluster_size": 0}, "cluster_size: must be >= 1"),
        ({"clustering": "dbscan"}, "clustering: 'dbscan' is not allowed"),
        ({"representatives": 0}, "representatives: must be >= 1"),
        ({"pick": "best"}, "pick: 'best' is not allowed"),
        ({"niter": 0}, "niter: must be >= 1"),
        ({"proj_dim": 0}, "proj_dim: must be >= 1"),
        ({"method": "fast"}, "method: 'fast' is not allowed"),
        ({"method": "logra"}, "cannot apply Adam"),
    ],
)
def test_bad_params(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_dataclass(ClusterLessParams, raw, "datasteer.params")
    assert message in str(err.value)


def test_feature_rows_that_are_not_finite_are_left_out_of_the_cluster_scores() -> None:
    from datasteer.errors import NonFiniteInputError

    nan, inf = float("nan"), float("inf")
    target = torch.tensor([[1.0, 0.0]])
    grads = GRADS.clone()
    grads[0] = torch.tensor([nan, 0.0])  # A's nearest representatives: 0 (NaN) and 2 (0, 1)
    ops = FakeOps(embeddings=EMB, gradients=grads, targets=[FakeOps(gradients=target)])
    sel = selector(pick="nearest", representatives=2, adam=False)
    scores = sel.cluster_scores(select_context(ops=ops, num_samples=4))
    torch.testing.assert_close(scores, torch.tensor([0.0, C22]), atol=1e-6, rtol=0)  # A: (0, 1) alone
    assert sel.report() == {"nonfinite": 1}
    grads[[1, 3]] = inf  # every representative of B
    ops = FakeOps(embeddings=EMB, gradients=grads, targets=[FakeOps(gradients=target)])
    scores = sel.cluster_scores(select_context(ops=ops, num_samples=4))
    assert scores[1] == -inf and sel.report() == {"nonfinite": 3}  # B ranks last
    grads[[2]] = inf
    ops = FakeOps(embeddings=EMB, gradients=grads, targets=[FakeOps(gradients=target)])
    with pytest.raises(NonFiniteInputError, match="no finite gradient feature"):
        sel.select(select_context(ops=ops, num_samples=4))


def test_a_pool_embedding_that_is_not_finite_forms_a_cluster_that_ranks_last() -> None:
    emb = EMB.clone()
    emb[5] = float("nan")
    ops = FakeOps(embeddings=emb, gradients=GRADS, targets=[FakeOps(gradients=torch.tensor([[0.0, -1.0]]))])
    sel = selector(pick="nearest", representatives=2, adam=False)
    chosen = sel.select(select_context(ops=ops, num_samples=6))
    assert sel.labels is not None and sel.left_out == 2 and sel.labels.tolist() == [0, 1, 0, 1, 0, 2]
    assert int(chosen[-1]) == 5  # its own cluster, ranked after every scored one
    (call,) = ops.calls_to("gradient_features")
    assert 5 not in call.indices and sel.report() == {"nonfinite": 1}
    again = selector(pick="nearest", representatives=2, adam=False)
    again.load_state_dict(sel.state_dict())
    assert again.left_out == 2 and torch.equal(again.labels, sel.labels)
