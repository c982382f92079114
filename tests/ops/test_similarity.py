"""Tests of datasteer.ops.similarity: chunked cosine scoring against a brute-force computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datasteer.ops.similarity import mean_similarity, topk_similarity
from datasteer.rng import torch_generator


def brute_force(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return F.normalize(q, dim=1) @ F.normalize(x, dim=1).T


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
@pytest.mark.parametrize("as_numpy", [True, False])
def test_chunked_similarity_matches_brute_force(chunk_rows: int, as_numpy: bool) -> None:
    gen = torch_generator(0, "test-similarity")
    x = torch.randn(100, 16, generator=gen)
    q = torch.randn(5, 16, generator=gen)
    pool = x.numpy() if as_numpy else x
    sims = brute_force(x, q)

    scores, idx = topk_similarity(pool, q, 10, chunk_rows=chunk_rows)
    ref_scores, ref_idx = torch.topk(sims, 10, dim=1)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(scores, ref_scores, atol=1e-6)

    mean = mean_similarity(pool, q, chunk_rows=chunk_rows)
    assert mean.shape == (100,)
    assert torch.allclose(mean, sims.mean(0), atol=1e-6)


def test_edge_cases() -> None:
    gen = torch_generator(1, "test-similarity")
    x = torch.randn(60, 8, generator=gen)
    q = torch.randn(3, 8, generator=gen)
    # k larger than the rows: everything, sorted.
    scores, idx = topk_similarity(x, q, 100, chunk_rows=11)
    assert idx.shape == (3, 60) and bool((scores[:, :-1] >= scores[:, 1:]).all())
    assert sorted(idx[0].tolist()) == list(range(60))
    # One (d,) query is a batch of one; half precision is scored in float32.
    assert topk_similarity(x, q[0], 4)[1].shape == (1, 4)
    assert torch.allclose(mean_similarity(x.half(), q[0]), brute_force(x.half().float(), q[:1])[0], atol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        topk_similarity(x, q, 0)
    with pytest.raises(ValueError, match="chunk_rows"):
        mean_similarity(x, q, chunk_rows=0)
