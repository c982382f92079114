"""Tests of datasteer.ops.feature_store: round trips, fingerprints, crash safety, and
streaming similarity against a brute-force computation."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datasteer.ops.feature_store import FeatureStore, fingerprint, mean_similarity, merge_topk, topk_similarity
from datasteer.rng import numpy_generator, torch_generator
from tests.factories import make_model


def features(n: int = 50, d: int = 8, dtype: type = np.float32) -> np.ndarray:
    return numpy_generator(0, "test-feature-store", n, d).standard_normal((n, d)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip(tmp_path: Path, dtype: type) -> None:
    store = FeatureStore(tmp_path / "cache")
    x = features(dtype=dtype)
    store.save("fp", x, dtype=dtype, chunk_rows=7, meta={"method": "test"})
    assert store.check("fp") == (True, "fingerprint matches")
    assert store.shape == (50, 8)
    loaded = store.open()
    assert loaded.dtype == dtype and np.array_equal(loaded, x)
    assert np.array_equal(np.load(store.data_path), x)  # a plain .npy for any tool
    side = json.loads(store.sidecar_path.read_text())
    assert side["shape"] == [50, 8] and side["fingerprint"] == "fp" and side["meta"] == {"method": "test"}
    chunks = list(store.iter_chunks(16, start=3, stop=40))
    assert [first for first, _ in chunks] == [3, 19, 35]
    assert np.array_equal(np.concatenate([c for _, c in chunks]), x[3:40])


def test_streamed_chunks_and_tensor_input(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    x = torch.from_numpy(features())
    store.get_or_compute("fp", lambda: (x[i : i + 9] for i in range(0, 50, 9)), dtype=np.float16)
    assert np.allclose(store.open(), x.numpy(), atol=1e-2)
    with pytest.raises(ValueError, match="columns"), store.writer("fp2") as w:
        w.write(x[:2])
        w.write(x[:2, :3])
    assert store.check("fp")[0]  # the failed write left the old store intact


def test_fingerprint_tracks_model_data_and_settings() -> None:
    model = make_model()
    data = {"indices": [0, 1, 2], "input_ids": [[5, 6], [7], [8, 9, 10]]}
    settings = {"method": "mean", "layer": -1, "seed": 0}
    base = fingerprint(model=model, data=data, settings=settings)
    assert base == fingerprint(model=make_model(), data=data, settings=settings)  # same weights, new object
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    assert fingerprint(model=model, data=data, settings=settings) != base
    model = make_model()
    assert fingerprint(model=model, data={**data, "indices": [0, 1, 3]}, settings=settings) != base
    assert fingerprint(model=model, data={**data, "input_ids": [[5, 6], [7], [8, 9, 11]]}, settings=settings) != base
    assert fingerprint(model=model, data=data, settings={**settings, "layer": -2}) != base
    assert fingerprint(model_state="step-10", data=data, settings=settings) != fingerprint(
        model_state="step-20", data=data, settings=settings
    )
    # Concatenation does not collide: the structure is hashed, not just the bytes.
    assert fingerprint(data=["ab"], settings={}) != fingerprint(data=["a", "b"], settings={})
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint(data=object(), settings={})


def test_get_or_compute_recomputes_on_any_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = make_model()
    data = {"indices": list(range(5))}
    calls: list[str] = []

    def compute(tag: str) -> np.ndarray:
        calls.append(tag)
        return features(5, 4)

    store = FeatureStore(tmp_path)

    def run(fp: str, tag: str) -> None:
        store.get_or_compute(fp, lambda: compute(tag))

    fp = fingerprint(model=model, data=data, settings={"pooling": "mean"})
    with caplog.at_level(logging.INFO, logger="datasteer.ops.feature_store"):
        run(fp, "first")
        run(fp, "cached")
        assert calls == ["first"]
        with torch.no_grad():
            next(model.parameters()).mul_(1.01)
        run(fingerprint(model=model, data=data, settings={"pooling": "mean"}), "weights")
        run(fingerprint(model=model, data={"indices": [0, 1, 2]}, settings={"pooling": "mean"}), "data")
        run(fingerprint(model=model, data={"indices": [0, 1, 2]}, settings={"pooling": "last"}), "settings")
    assert calls == ["first", "weights", "data", "settings"]
    assert sum("fingerprint changed" in r.getMessage() for r in caplog.records) == 3


def test_crash_mid_write_leaves_no_complete_store(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    x = features()

    def crashing() -> Iterator[np.ndarray]:
        yield x[:10]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        store.get_or_compute("fp", crashing)
    assert store.check("fp") == (False, "no complete store (missing sidecar)")
    assert list(tmp_path.iterdir()) == []  # the temp file was discarded

    # A hard crash (no cleanup at all): rows written, never committed.
    w = store.writer("fp", rows=50)
    w.write(x[:20])
    w._file.flush()
    assert not store.check("fp")[0] and not store.data_path.exists()
    w.abort()

    # A complete store, then a crash while replacing it: the old store stays valid.
    store.save("old", x)
    w = store.writer("new", rows=50)
    w.write(x[:20])
    assert store.check("old")[0] and not store.check("new")[0]
    with pytest.raises(ValueError, match="20 rows written, 50 announced"):
        w.commit()
    assert store.check("old")[0]

    # A truncated data file under a valid sidecar is detected too.
    with open(store.data_path, "r+b") as f:
        f.truncate(store.data_path.stat().st_size - 4)
    assert store.check("old") == (False, "data file is truncated")
    calls: list[int] = []

    def compute() -> np.ndarray:
        calls.append(1)
        return x

    store.get_or_compute("old", compute)
    assert calls == [1] and store.check("old")[0]


def brute_force(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return F.normalize(q, dim=1) @ F.normalize(x, dim=1).T


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
@pytest.mark.parametrize("in_store", [True, False])
def test_streaming_similarity_matches_brute_force(tmp_path: Path, chunk_rows: int, in_store: bool) -> None:
    gen = torch_generator(0, "test-similarity")
    x = torch.randn(100, 16, generator=gen)
    q = torch.randn(5, 16, generator=gen)
    source: FeatureStore | torch.Tensor = x
    if in_store:
        source = FeatureStore(tmp_path)
        source.save("fp", x)
    sims = brute_force(x, q)

    scores, idx = topk_similarity(source, q, 10, chunk_rows=chunk_rows)
    ref_scores, ref_idx = torch.topk(sims, 10, dim=1)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(scores, ref_scores, atol=1e-6)

    mean = mean_similarity(source, q, chunk_rows=chunk_rows)
    assert mean.shape == (100,)
    assert torch.allclose(mean, sims.mean(0), atol=1e-6)

    dot_scores, dot_idx = topk_similarity(source, q, 3, chunk_rows=chunk_rows, metric="dot")
    ref_dot, ref_dot_idx = torch.topk(q @ x.T, 3, dim=1)
    assert torch.equal(dot_idx, ref_dot_idx) and torch.allclose(dot_scores, ref_dot, atol=1e-5)
    assert torch.allclose(mean_similarity(source, q, chunk_rows=chunk_rows, metric="dot"), (q @ x.T).mean(0), atol=1e-5)


def test_row_ranges_merge_to_the_whole(tmp_path: Path) -> None:
    gen = torch_generator(1, "test-similarity")
    x = torch.randn(60, 8, generator=gen)
    q = torch.randn(3, 8, generator=gen)
    store = FeatureStore(tmp_path)
    store.save("fp", x)
    full_scores, full_idx = topk_similarity(store, q, 5, chunk_rows=11)
    # Two "ranks" score their halves; the caller concatenates and merges.
    parts = [topk_similarity(store, q, 5, chunk_rows=11, start=s, stop=e) for s, e in [(0, 25), (25, 60)]]
    assert int(parts[1][1].min()) >= 25  # global row indices
    scores, idx = merge_topk(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), 5)
    assert torch.equal(idx, full_idx) and torch.equal(scores, full_scores)
    halves = [mean_similarity(store, q, start=s, stop=e) for s, e in [(0, 25), (25, 60)]]
    assert torch.allclose(torch.cat(halves), mean_similarity(store, q))
    # k larger than the rows: everything, sorted.
    scores, idx = topk_similarity(store, q, 100)
    assert idx.shape == (3, 60) and bool((scores[:, :-1] >= scores[:, 1:]).all())
