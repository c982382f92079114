"""Tests of the random selector."""

from __future__ import annotations

import pytest
import torch

from datasteer.selectors.base import SelectContext
from datasteer.selectors.random import RandomSelector, RandomSelectParams
from tests.factories import select_context


def select(params: RandomSelectParams, ctx: SelectContext) -> torch.Tensor:
    out = RandomSelector(params).select(ctx)
    assert out.dtype == torch.long and out.ndim == 1
    return out


def test_without_replacement_indices_are_distinct() -> None:
    out = select(RandomSelectParams(), select_context(num_samples=7, pool_size=10))
    assert len(out) == 7
    assert len(set(out.tolist())) == 7
    assert set(out.tolist()) <= set(range(10))


def test_whole_pool_is_a_permutation() -> None:
    out = select(RandomSelectParams(), select_context(num_samples=10, pool_size=10))
    assert sorted(out.tolist()) == list(range(10))


def test_more_than_the_pool_concatenates_whole_permutations() -> None:
    out = select(RandomSelectParams(), select_context(num_samples=25, pool_size=10)).tolist()
    assert len(out) == 25
    assert sorted(out[:10]) == list(range(10))
    assert sorted(out[10:20]) == list(range(10))
    assert len(set(out[20:])) == 5  # the last, partial permutation has no repeats either
    counts = torch.bincount(torch.tensor(out), minlength=10)
    assert set(counts.tolist()) == {2, 3}  # floor(25 / 10) or ceil(25 / 10)
    assert int((counts == 3).sum()) == 5


@pytest.mark.parametrize(("fraction", "expected"), [(0.3, 3), (1.0, 10), (0.01, 1)])
def test_fraction_of_the_pool(fraction: float, expected: int) -> None:
    out = select(RandomSelectParams(fraction=fraction), select_context(num_samples=40, pool_size=10))
    assert len(out) == expected  # the fraction overrides num_samples; at least one index
    assert len(set(out.tolist())) == expected


def test_with_replacement() -> None:
    out = select(RandomSelectParams(replacement=True), select_context(num_samples=200, pool_size=50))
    assert len(out) == 200
    assert int(out.min()) >= 0 and int(out.max()) < 50
    counts = torch.bincount(out, minlength=50)
    # Without replacement every index would appear exactly 4 times.
    assert int(counts.max()) > 4 and int(counts.min()) < 4


def test_deterministic_per_generator_seed() -> None:
    params = RandomSelectParams()
    first = select(params, select_context(num_samples=8, pool_size=20, seed=3, update=1))
    assert torch.equal(first, select(params, select_context(num_samples=8, pool_size=20, seed=3, update=1)))
    assert not torch.equal(first, select(params, select_context(num_samples=8, pool_size=20, seed=4, update=1)))
    assert not torch.equal(first, select(params, select_context(num_samples=8, pool_size=20, seed=3, update=2)))
