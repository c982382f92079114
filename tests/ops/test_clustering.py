"""Clustering ops: blobs recovered, k-center's farthest-first picks, LSH buckets, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datasteer.ops.clustering import (
    CLUSTER_METHODS,
    cluster,
    compact_labels,
    kcenter,
    kmeans,
    lsh_buckets,
    random_partition,
)
from datasteer.rng import torch_generator


def blobs(per: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three tight blobs around orthogonal unit directions, rows shuffled."""
    g = torch_generator(seed, "blobs")
    centres = torch.eye(8)[:3] * 10
    truth = torch.arange(3).repeat_interleave(per)
    x = centres[truth] + 0.05 * torch.randn(3 * per, 8, generator=g)
    perm = torch.randperm(3 * per, generator=g)
    return x[perm], truth[perm]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(compact_labels(a), compact_labels(b))


def test_compact_labels_orders_by_first_member() -> None:
    assert compact_labels(torch.tensor([7, 7, 3, 9, 3, 7])).tolist() == [0, 0, 1, 2, 1, 0]
    assert compact_labels(torch.tensor([], dtype=torch.long)).tolist() == []


@pytest.mark.parametrize("method", ["kmeans", "spherical", "kcenter"])
def test_well_separated_blobs_are_recovered(method: str) -> None:
    x, truth = blobs()
    data = F.normalize(x, dim=1) if method == "spherical" else x
    labels = cluster(data, 3, method, generator=torch_generator(0, "c"))  # type: ignore[arg-type]
    assert same_partition(labels, truth)


def seed_whose_first_draw_is(start: int, n: int) -> int:
    """A seed for which kcenter's first (random) center is ``start``, so the rest is checkable by hand."""
    return next(s for s in range(1000) if int(torch.randint(0, n, (1,), generator=torch_generator(s, "k"))) == start)


# Points 0, 1, 2, 10, 11, 30 (indices 0..5). Farthest-first by hand, e.g. from 0: 30 is farthest
# (d=30); distances to {0, 30} are 0,1,2,10,11,0 -> 11 (index 4); to {0, 30, 11}: 0,1,2,1,0,0 -> 2.
# From 10 (index 3): 30 (d=20); to {10, 30}: 10,9,8,0,1,0 -> 0; to {10, 30, 0}: 0,1,2,0,1,0 -> 2.
@pytest.mark.parametrize(("start", "expected"), [(0, [0, 5, 4, 2]), (3, [3, 5, 0, 2]), (5, [5, 0, 4, 2])])
def test_kcenter_takes_the_farthest_point_each_time(start: int, expected: list[int]) -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [30.0]])
    centers, _ = kcenter(x, 4, generator=torch_generator(seed_whose_first_draw_is(start, 6), "k"))
    assert centers.tolist() == expected
    # With 3 centers every start gives the groups {0, 1, 2}, {10, 11}, {30}.
    _, labels = kcenter(x, 3, generator=torch_generator(seed_whose_first_draw_is(start, 6), "k"))
    assert same_partition(labels, torch.tensor([0, 0, 0, 1, 1, 2]))


def test_kcenter_stops_when_every_point_is_a_center() -> None:
    x = torch.tensor([[1.0], [1.0], [4.0]])
    centers, labels = kcenter(x, 3, generator=torch_generator(0, "k"))
    assert len(centers) == 2 and same_partition(labels, torch.tensor([0, 0, 1]))


def test_lsh_puts_identical_and_parallel_vectors_together() -> None:
    base = torch.randn(5, 16, generator=torch_generator(1, "v"))
    x = torch.cat([base, base, 3 * base])  # copies and positive multiples: same angle
    labels = lsh_buckets(x, 8, generator=torch_generator(0, "lsh"))
    assert torch.equal(labels[:5], labels[5:10]) and torch.equal(labels[:5], labels[10:])
    assert int(labels.max()) + 1 <= 8
    # opposite vectors never share a bucket (every sign flips)
    opposite = lsh_buckets(torch.cat([base[:1], -base[:1]]), 8, generator=torch_generator(0, "lsh"))
    assert opposite.tolist() == [0, 1]


def test_random_partition_is_balanced() -> None:
    labels = random_partition(10, 3, generator=torch_generator(0, "r"))
    assert sorted(torch.bincount(labels).tolist()) == [3, 3, 4]
    assert random_partition(2, 5, generator=torch_generator(0, "r")).unique().numel() == 2


def test_kmeans_clamps_k_to_the_number_of_points() -> None:
    x = torch.randn(3, 4, generator=torch_generator(0, "x"))
    labels = kmeans(x, 10, generator=torch_generator(0, "k"))
    assert labels.numel() == 3 and int(labels.max()) < 3


@pytest.mark.parametrize("method", CLUSTER_METHODS)
def test_deterministic_for_a_fixed_seed(method: str) -> None:
    x = F.normalize(torch.randn(200, 12, generator=torch_generator(0, "x")), dim=1)
    a = cluster(x, 10, method, generator=torch_generator(7, "c"))  # type: ignore[arg-type]
    b = cluster(x, 10, method, generator=torch_generator(7, "c"))  # type: ignore[arg-type]
    assert torch.equal(a, b)
    assert a.shape == (200,) and int(a.min()) == 0 and int(a.max()) < 16
    assert torch.equal(torch.unique(a), torch.arange(int(a.max()) + 1))  # compact: no empty label


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown clustering method 'dbscan'"):
        cluster(torch.zeros(2, 2), 2, "dbscan", generator=torch_generator(0))  # type: ignore[arg-type]
