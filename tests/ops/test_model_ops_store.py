"""ModelOps' feature stores: each rank's rows on disk, equal to the gathered in-memory features."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import default_data_collator

from datasteer.ops import GradFeatureConfig, ModelOps, embed, grad_features
from tests.factories import make_dataset, make_model


def ops_over(tmp_path: Path) -> ModelOps:
    return ModelOps(
        make_model(), make_dataset(), default_data_collator, 4, torch.device("cpu"), scratch_dir=str(tmp_path)
    )


def test_gradient_feature_store_holds_the_rows_of_grad_features(tmp_path: Path) -> None:
    ops = ops_over(tmp_path)
    indices = list(range(3, 40, 2))
    config = GradFeatureConfig(method="vmap", proj_dim=32)
    with ops.gradient_feature_store(indices, config) as store:
        assert (store.total, store.start, store.stop, store.width) == (19, 0, 19, 32)
        assert store.path.parent.parent == tmp_path
        stored = store.to_tensor()
    assert list(tmp_path.iterdir()) == []  # removed when done
    direct = grad_features(ops.model, ops.batches(indices), config)
    assert torch.equal(stored, direct)
    assert torch.equal(ops.gradient_features(indices, config), direct)


def test_embedding_store_holds_the_rows_of_embed(tmp_path: Path) -> None:
    ops = ops_over(tmp_path)
    indices = [5, 1, 7, 30, 2]
    with ops.embedding_store(indices, pooling="last") as store:
        stored = store.to_tensor()
    assert torch.equal(stored, embed(ops.model, ops.batches(indices), pooling="last"))
    assert list(tmp_path.iterdir()) == []
