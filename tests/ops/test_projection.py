"""Tests of datasteer.ops.projection: streaming equals materialised, blocks add up, Kronecker."""

from __future__ import annotations

import math

import pytest
import torch

from datasteer.ops.projection import KroneckerProjection, ParamLayout, StreamingProjection
from datasteer.rng import torch_generator


def data(n: int, d: int, key: str = "x") -> torch.Tensor:
    return torch.randn(n, d, generator=torch_generator(0, "test-projection", key))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_streaming_equals_materialised(kind: str) -> None:
    proj = StreamingProjection(out_dim=7, seed=3, kind=kind, chunk_rows=5)  # type: ignore[arg-type]
    x = data(4, 23)
    matrix = proj.materialize(23)
    assert matrix.shape == (23, 7)
    torch.testing.assert_close(proj.project(x), x @ matrix)


def test_rademacher_entries_and_gaussian_scale() -> None:
    rad = StreamingProjection(out_dim=16, seed=0).materialize(100)
    assert torch.allclose(rad.abs(), torch.full_like(rad, 1 / math.sqrt(16)))
    gauss = StreamingProjection(out_dim=64, seed=0, kind="gaussian", chunk_rows=512).materialize(2000)
    assert abs(float(gauss.var()) * 64 - 1.0) < 0.05


def test_projection_is_deterministic_and_seeded() -> None:
    x = data(3, 50)
    a = StreamingProjection(8, seed=1, chunk_rows=16).project(x)
    assert torch.equal(a, StreamingProjection(8, seed=1, chunk_rows=16).project(x))
    assert not torch.allclose(a, StreamingProjection(8, seed=2, chunk_rows=16).project(x))
    # The rows of P do not depend on D: a prefix projects with the prefix rows.
    torch.testing.assert_close(
        StreamingProjection(8, seed=1, chunk_rows=16).materialize(20),
        StreamingProjection(8, seed=1, chunk_rows=16).materialize(50)[:20],
    )


def test_per_parameter_blocks_sum_to_flat_projection() -> None:
    shapes = {"w": (3, 4), "b": (5,), "e": (6, 2)}  # 12 + 5 + 12 = 29 rows, chunks of 8
    grads = {name: data(2, math.prod(s), name).reshape(2, *s) for name, s in shapes.items()}
    layout = ParamLayout.from_named((name, torch.empty(s)) for name, s in shapes.items())
    assert layout.total == 29 and [b.offset for b in layout.blocks] == [0, 12, 17]
    proj = StreamingProjection(5, seed=0, chunk_rows=8)
    flat = layout.flatten(grads)
    torch.testing.assert_close(layout.project(grads, proj), proj.project(flat))
    summed = sum(proj.project_blocks([(b.offset, grads[b.name].reshape(2, -1))]) for b in layout.blocks)
    torch.testing.assert_close(summed, proj.project(flat))


def test_kronecker_projection_equals_explicit_kron() -> None:
    kron = KroneckerProjection.create(in_features=5, out_features=4, in_dim=3, out_dim=2, seed=0, key="layer")
    x, delta = data(2, 6 * 5, "in").reshape(2, 6, 5), data(2, 6 * 4, "out").reshape(2, 6, 4)
    grad = torch.einsum("ntb,nta->nba", delta, x)  # per-sample dL/dW = sum_t delta_t x_t^T
    expected = grad.reshape(2, -1) @ kron.matrix().T
    torch.testing.assert_close(kron.project(x, delta), expected)
    assert kron.dim == 6 and kron.matrix().shape == (6, 20)
    other = KroneckerProjection.create(5, 4, 3, 2, seed=0, key="other-layer")
    assert not torch.equal(kron.p_in, other.p_in)


def test_cached_chunks_equal_fresh_ones_and_the_cache_stays_in_budget() -> None:
    from datasteer.ops.projection import CHUNK_CACHE, _ChunkCache

    proj = StreamingProjection(out_dim=16, seed=3, chunk_rows=32)
    first = proj.chunk(2).clone()
    CHUNK_CACHE.clear()
    torch.testing.assert_close(proj.chunk(2), first, rtol=0, atol=0)
    assert proj.chunk(2) is proj.chunk(2)  # served from the cache
    small = _ChunkCache(max_bytes=2 * 32 * 16 * 4)
    made = []
    for i in range(4):
        small.get(("k", i), lambda i=i: made.append(i) or torch.zeros(32, 16))
    assert small._bytes <= small.max_bytes and list(small._items) == [("k", 2), ("k", 3)]
    small.get(("k", 0), lambda: made.append("again") or torch.zeros(32, 16))
    assert made[-1] == "again"
