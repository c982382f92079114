"""Offline preparation: faiss search and padding, files written for a tiny model, fingerprint checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from datasteer.errors import ConfigError, SteeringStateError
from datasteer.prepare import build_index, prepare_selection, search, tsds_from_embeddings
from datasteer.selectors.near import NearParams, NearSelector
from datasteer.selectors.tsds import TsdsParams, TsdsSelector
from tests.factories import DOMAINS, make_dataset, make_model, select_context, tiny_config
from tests.fakes import FakeOps


def unit(degrees: np.ndarray) -> np.ndarray:
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], 1).astype(np.float32)


def test_search_returns_euclidean_distances_nearest_first() -> None:
    pool = unit(np.array([0.0, 90.0, 180.0, 10.0]))
    dist, ids = search(build_index(pool), unit(np.array([5.0])), 3)
    assert ids.tolist() == [[0, 3, 1]] or ids.tolist() == [[3, 0, 1]]
    # |u(5) - u(0)| = 2 sin(2.5 deg); |u(5) - u(90)| = 2 sin(42.5 deg)
    np.testing.assert_allclose(dist[0], [2 * np.sin(np.radians(2.5))] * 2 + [2 * np.sin(np.radians(42.5))], atol=1e-6)


def test_ivf_padding_stays_padding() -> None:
    # Two far-apart clusters, one IVF list probed: a query sees only its own cluster's rows.
    pool = unit(np.concatenate([np.linspace(0, 10, 20), np.linspace(170, 180, 20)]))
    index = build_index(pool, "ivf", lists=2, probe=1)
    dist, ids = search(index, unit(np.array([5.0])), 30)
    assert (ids[0, :20] >= 0).all() and (ids[0, :20] < 20).all()
    assert (ids[0, 20:] == -1).all() and np.isinf(dist[0, 20:]).all()
    params = TsdsParams(prepared="unused", neighbours=30, kde_neighbours=5, index="ivf", ivf_lists=2, ivf_probe=1)
    probs = tsds_from_embeddings(pool, unit(np.array([5.0])), params)
    assert probs.sum() == pytest.approx(1.0) and probs[20:].sum() == 0  # never the last candidate via -1


# -- a tiny model and pool ----------------------------------------------------------------------


def pool_and_targets() -> tuple[Any, Any, np.ndarray]:
    pool = make_dataset((40, 24, 16))
    targets = make_dataset((0, 0, 8), seed=1)  # rows of the third domain (gamma)
    ids = np.asarray([DOMAINS.index(d) for d in pool["domain"]], dtype=np.int64)
    return pool, targets, ids


def fake_ops(pool: Any, targets: Any, model: nn.Module | None = None) -> FakeOps:
    """The pool and target rows an online selector fingerprints; the model is read for its architecture."""
    return FakeOps(dataset=pool, targets=[FakeOps(dataset=targets)], model=model or make_model())


def run_prepare(kind: str, params: Any, pool: Any, targets: Any, ids: np.ndarray) -> Path:
    return prepare_selection(
        kind, params, pool=pool, domains=ids, domain_names=DOMAINS, targets=[targets], model=make_model(), batch_size=8
    )


def test_tsds_prepare_writes_probabilities_the_selector_uses(tmp_path: Path) -> None:
    pool, targets, ids = pool_and_targets()
    params = TsdsParams(prepared=str(tmp_path / "tsds"), neighbours=16, kde_neighbours=8)
    meta = run_prepare("tsds", params, pool, targets, ids)
    assert meta.name == "tsds.json" and (meta.parent / "tsds.safetensors").is_file()
    chosen = TsdsSelector(params).select(
        select_context(ops=fake_ops(pool, targets), num_samples=12, domains=ids, names=DOMAINS)
    )
    assert len(chosen) == 12 and len(set(chosen.tolist())) == 12
    # Targets come from the third domain's vocabulary band: their neighbours do too.
    assert (ids[chosen.numpy()] == 2).mean() > 0.5
    # Deterministic preparation: the same inputs give the same file content.
    again = TsdsSelector(params).select(
        select_context(ops=fake_ops(pool, targets), num_samples=12, domains=ids, names=DOMAINS)
    )
    assert torch.equal(chosen, again)


def test_changed_pool_or_settings_make_the_selector_refuse(tmp_path: Path) -> None:
    pool, targets, ids = pool_and_targets()
    params = TsdsParams(prepared=str(tmp_path), neighbours=16, kde_neighbours=8)
    run_prepare("tsds", params, pool, targets, ids)
    cases = [
        (params, fake_ops(make_dataset((40, 24, 16), seed=5), targets), "another pool or other settings"),
        (replace(params, alpha=0.3), fake_ops(pool, targets), "datasteer prepare tsds"),
        (params, fake_ops(pool, make_dataset((0, 8, 0), seed=1)), "another pool"),
        # embedded by another model
        (params, fake_ops(pool, targets, LlamaForCausalLM(tiny_config(hidden_size=32))), "other settings"),
    ]
    for selector_params, ops, message in cases:
        with pytest.raises(SteeringStateError, match=message):
            TsdsSelector(selector_params).select(select_context(ops=ops, num_samples=4, domains=ids, names=DOMAINS))


def test_near_prepare_writes_neighbour_lists(tmp_path: Path) -> None:
    pool, targets, ids = pool_and_targets()
    params = NearParams(neighbours=4, prepared=str(tmp_path))
    run_prepare("near", params, pool, targets, ids)
    ctx = select_context(ops=fake_ops(pool, targets), num_samples=8, domains=ids, names=DOMAINS)
    near = NearSelector(params)
    first = near.select(ctx)
    assert near.neighbours is not None and tuple(near.neighbours.shape) == (8, 4)
    assert len(set(first.tolist())) == 8 and (ids[first.numpy()] == 2).mean() > 0.5
    with pytest.raises(SteeringStateError, match="datasteer prepare near"):
        NearSelector(NearParams(neighbours=5, prepared=str(tmp_path))).select(ctx)


def test_prepare_needs_targets_and_a_destination(tmp_path: Path) -> None:
    pool, _, ids = pool_and_targets()
    with pytest.raises(ConfigError, match="eval_dataset"):
        run_prepare("tsds", TsdsParams(prepared=str(tmp_path)), pool, make_dataset((0, 0, 0)), ids)
    with pytest.raises(ConfigError, match="prepared"):
        run_prepare("near", NearParams(), pool, make_dataset((0, 0, 2)), ids)
    with pytest.raises(ConfigError, match="refresh"):
        NearParams(prepared=str(tmp_path), refresh=True)


# -- through LLaMA-Factory (the CLI's path) -------------------------------------------------------


@pytest.mark.slow
def test_prepare_through_llamafactory_matches_the_training_pool(tmp_path: Path) -> None:
    from datasteer.cli import prepare_run
    from datasteer.prepare import prepare

    overrides = [
        f"output_dir={tmp_path / 'out'}",
        f"datasteer.params.prepared={tmp_path / 'prep'}",
        "dataset=arithmetic,noise",
        "max_samples=48",
        "cutoff_len=32",
        "datasteer.params.neighbours=16",
    ]
    config = str(Path(__file__).resolve().parents[1] / "examples" / "select_tsds.yaml")
    args, steering = prepare_run(config, overrides)
    meta = prepare("tsds", args, steering)
    assert meta.is_file() and (meta.parent / "tsds.safetensors").is_file()
    with pytest.raises(ConfigError, match="algorithm: near"):
        prepare("near", args, steering)
