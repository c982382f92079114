"""FeatureStore: round trip, chunked writes and reads, cleanup, and scores equal to the in-memory path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datasteer.ops.feature_store import FeatureStore
from datasteer.ops.similarity import mean_similarity, topk_similarity
from datasteer.rng import torch_generator

ROWS = torch.randn(37, 6, generator=torch_generator(0, "store"))
ROW_BYTES = 6 * 4


def test_round_trip_in_appended_blocks(tmp_path: Path) -> None:
    with FeatureStore(len(ROWS), directory=tmp_path, chunk_bytes=5 * ROW_BYTES) as store:
        for first in range(0, len(ROWS), 8):  # written as computed, a batch at a time
            store.append(ROWS[first : first + 8])
        chunks = list(store.chunks())
        assert [(first, len(rows)) for first, rows in chunks] == [(f, min(5, 37 - f)) for f in range(0, 37, 5)]
        assert all(isinstance(rows, np.memmap) for _, rows in chunks)
        assert torch.equal(store.to_tensor(), ROWS)
        assert store.path.stat().st_size == ROWS.numel() * 4


def test_the_file_and_its_directory_are_removed(tmp_path: Path) -> None:
    store = FeatureStore.from_tensor(ROWS, directory=tmp_path)
    directory = store.path.parent
    assert store.path.is_file()
    store.close()
    assert not directory.exists() and list(tmp_path.iterdir()) == []
    store.close()  # idempotent
    dropped = FeatureStore.from_tensor(ROWS, directory=tmp_path)
    del dropped  # garbage-collected without close()
    assert list(tmp_path.iterdir()) == []


def test_bad_writes_are_refused(tmp_path: Path) -> None:
    with FeatureStore(3, directory=tmp_path) as store:
        with pytest.raises(ValueError, match="no width yet"):
            _ = store.width
        store.append(torch.zeros(2, 4))
        with pytest.raises(ValueError, match="width 5 appended to a store of width 4"):
            store.append(torch.zeros(1, 5))
        with pytest.raises(ValueError, match="holds 3 rows"):
            store.append(torch.zeros(2, 4))
        with pytest.raises(ValueError, match="3 rows; 2 were written"):
            store.to_tensor()


@pytest.mark.parametrize("chunk_rows", [1, 2, 4, 37, 100])
def test_scores_equal_the_in_memory_path(tmp_path: Path, chunk_rows: int) -> None:
    queries = torch.randn(3, 6, generator=torch_generator(1, "queries"))
    with FeatureStore.from_tensor(ROWS, directory=tmp_path, chunk_bytes=chunk_rows * ROW_BYTES) as store:
        scores = store.row_scores(lambda rows: mean_similarity(rows, queries))
        top, idx = store.topk_similarity(queries, 5)
    want_top, want_idx = topk_similarity(ROWS, queries, 5)
    assert torch.equal(idx, want_idx)
    if chunk_rows < 4:  # BLAS takes other kernels for one or two rows: equal up to the last bits
        torch.testing.assert_close(scores, mean_similarity(ROWS, queries), rtol=0, atol=1e-6)
        torch.testing.assert_close(top, want_top, rtol=0, atol=1e-6)
    else:
        assert torch.equal(scores, mean_similarity(ROWS, queries)) and torch.equal(top, want_top)


def test_rows_that_are_not_finite_are_never_neighbours_while_enough_are_finite(tmp_path: Path) -> None:
    rows = ROWS.clone()
    rows[[0, 9]] = float("nan")
    rows[20, 2] = float("inf")
    queries = rows[[1, 2]] + 0.01
    with FeatureStore.from_tensor(rows, directory=tmp_path, chunk_bytes=4 * ROW_BYTES) as store:
        top, idx = store.topk_similarity(queries, 34)
        _, everything = store.topk_similarity(queries, 37)
    finite = [i for i in range(37) if i not in (0, 9, 20)]
    want_top, want_idx = topk_similarity(rows[finite], queries, 34)
    assert torch.equal(idx, torch.tensor(finite)[want_idx]) and torch.equal(top, want_top)
    assert set(everything[0, -3:].tolist()) == {0, 9, 20}  # listed last, when asked for every row


@pytest.mark.parametrize("chunk_rows", [3, 20])
def test_rows_appended_out_of_order_read_back_in_row_order(tmp_path: Path, chunk_rows: int) -> None:
    """Scoring passes append the longest rows first: scores, neighbours and the matrix still
    come back by row."""
    rows = torch.randn(20, 6, generator=torch_generator(3, "rows"))
    queries = torch.randn(4, 6, generator=torch_generator(4, "queries"))
    order = torch.randperm(20, generator=torch_generator(5, "order")).tolist()
    with FeatureStore(20, directory=tmp_path, chunk_bytes=chunk_rows * 6 * 4, order=order) as store:
        for first in range(0, 20, 7):
            store.append(rows[order[first : first + 7]])
        torch.testing.assert_close(store.to_tensor(), rows, rtol=0, atol=0)
        torch.testing.assert_close(store.row_scores(lambda c: torch.from_numpy(c).sum(1)), rows.sum(1))
        scores, idx = store.topk_similarity(queries, 5)
    want_scores, want_idx = topk_similarity(rows, queries, 5)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(scores, want_scores)
    with pytest.raises(ValueError, match="permutation"):
        FeatureStore(3, directory=tmp_path, order=[0, 0, 1])
