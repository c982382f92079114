"""ModelOps: rows scored longest first, results in the order asked for, batches with totals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset

from datasteer.errors import SteeringStateError
from datasteer.ops.gradients import GradFeatureConfig
from datasteer.ops.losses import IGNORE_INDEX, per_sample_loss
from datasteer.ops.model_ops import ModelOps, row_lengths
from tests.factories import VOCAB, make_model, training_args


def ragged_dataset(n: int = 13, seed: int = 0) -> Dataset:
    """Rows of 3..12 tokens, lengths in no particular order."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {"input_ids": [], "labels": []}
    for _ in range(n):
        ids = rng.integers(0, VOCAB, size=int(rng.integers(3, 13))).tolist()
        rows["input_ids"].append(ids)
        rows["labels"].append(ids)
    return Dataset.from_dict(rows)


class PadCollator:
    """Right-pads a list of rows to its longest row; records each batch's padded width."""

    def __init__(self) -> None:
        self.widths: list[int] = []
        self.padding = 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        self.widths.append(width)
        self.padding += sum(width - len(r["input_ids"]) for r in rows)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])

        mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
        return {
            "input_ids": pad("input_ids", 0),
            "labels": pad("labels", IGNORE_INDEX),
            "attention_mask": torch.tensor(mask),
        }


def ops_for(dataset: Any, batch_size: int = 4) -> tuple[ModelOps, PadCollator]:
    collator = PadCollator()
    return ModelOps(make_model(), dataset, collator, batch_size, torch.device("cpu")), collator


def one_by_one_losses(ops: ModelOps, indices: list[int]) -> torch.Tensor:
    model = ops.model.eval()
    out = []
    with torch.no_grad():
        for i in indices:
            ids = torch.tensor([ops.dataset[i]["input_ids"]])
            out.append(per_sample_loss(model(input_ids=ids).logits, ids)[0])
    return torch.cat(out)


def test_row_lengths_read_arrow_through_selects_and_views() -> None:
    ds = ragged_dataset()
    shuffled = ds.shuffle(seed=3).select(range(2, 11))  # an indices mapping over the table
    want = [len(shuffled[i]["input_ids"]) for i in range(len(shuffled))]
    assert row_lengths(shuffled, list(range(len(shuffled)))) == want
    ops, _ = ops_for(shuffled)
    sub = ops.subset([4, 0, 7])
    assert row_lengths(sub.dataset, [0, 1, 2]) == [want[4], want[0], want[7]]
    assert row_lengths([{"input_ids": [1, 2]}, {"input_ids": [3]}], [1, 0]) == [1, 2]


def test_sample_losses_batch_rows_longest_first_and_return_them_in_order() -> None:
    ds = ragged_dataset()
    ops, collator = ops_for(ds)
    indices = [5, 0, 12, 3, 9, 1, 7]
    losses = ops.sample_losses(indices)
    torch.testing.assert_close(losses, one_by_one_losses(ops, indices), rtol=1e-5, atol=1e-5)
    lengths = sorted((len(ds[i]["input_ids"]) for i in indices), reverse=True)
    assert collator.widths == [lengths[0], lengths[4]]  # batches of 4 then 3, longest first
    padding_in_given_order = sum(
        max(chunk) - length
        for chunk in ([len(ds[i]["input_ids"]) for i in indices[s : s + 4]] for s in range(0, len(indices), 4))
        for length in chunk
    )
    assert collator.padding <= padding_in_given_order


def test_reference_losses_are_the_reference_models_sample_losses_and_survive_subset() -> None:
    ds = ragged_dataset()
    collator = PadCollator()
    reference = make_model(seed=1)
    ops = ModelOps(make_model(), ds, collator, 4, torch.device("cpu"), reference=reference)
    indices = [5, 0, 12, 3, 9]
    got = ops.reference_losses(indices)
    with_reference = ModelOps(reference, ds, collator, 4, torch.device("cpu"))
    torch.testing.assert_close(got, one_by_one_losses(with_reference, indices), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ops.sample_losses(indices))  # the live model's differ
    torch.testing.assert_close(ops.subset(indices).reference_losses([4, 0]), got[[4, 0]])
    with pytest.raises(SteeringStateError, match="no reference model was loaded"):
        ops_for(ds)[0].reference_losses([0])


def test_every_pass_returns_rows_in_the_order_asked_for() -> None:
    ds = ragged_dataset()
    ops, _ = ops_for(ds, batch_size=3)
    indices = [11, 2, 6, 0, 8]
    config = GradFeatureConfig(method="vmap", proj_dim=16)
    for compute in (
        lambda idx: ops.embeddings(idx),
        lambda idx: ops.gradient_features(idx, config),
        lambda idx: ops.sample_losses(idx),
    ):
        together = compute(indices)
        alone = torch.cat([compute([i]) for i in indices])
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_batches_have_a_length_for_progress_totals() -> None:
    ops, _ = ops_for(ragged_dataset(), batch_size=4)
    batches = ops.batches(list(range(10)))
    assert len(batches) == 3
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]


@pytest.mark.parametrize(("size", "expected"), [(None, 8), (5, 5)])
def test_the_trainer_scores_with_scoring_batch_size(tmp_path: Path, size: int | None, expected: int) -> None:
    """``datasteer.scoring_batch_size``, else the evaluation batch size (8 here)."""
    from tests.integrations.test_hf_trainer import build

    steering = {"paradigm": "select", "algorithm": "loss", "scoring_batch_size": size}
    trainer = build(tmp_path, steering, args=training_args(tmp_path, max_steps=1, per_device_eval_batch_size=8))
    loader = trainer.get_train_dataloader()
    assert trainer._steering_ops(loader).batch_size == expected


def test_a_target_set_computes_its_features_once_per_update() -> None:
    """Under a mixer a selector runs once per domain; the targets' features are computed once."""
    ds = ragged_dataset()
    collator = PadCollator()
    target = ModelOps(make_model(), ds, collator, 4, torch.device("cpu"), memoize=True)
    config = GradFeatureConfig(method="vmap", proj_dim=16)
    first = target.gradient_features(range(5), config)
    calls = len(collator.widths)
    assert torch.equal(target.gradient_features(range(5), config), first)
    assert torch.equal(target.embeddings(range(5)), target.embeddings(range(5)))
    assert len(collator.widths) == calls + 2  # the embeddings once; the features not again
    target.gradient_features(range(5), GradFeatureConfig(method="vmap", proj_dim=8))
    assert len(collator.widths) == calls + 4  # other settings: computed
    fresh = ModelOps(make_model(), ds, collator, 4, torch.device("cpu"))
    fresh.gradient_features(range(5), config)
    fresh.gradient_features(range(5), config)
    assert len(collator.widths) == calls + 8  # not memoized: computed each time


def test_every_scoring_pass_shows_a_total(monkeypatch: pytest.MonkeyPatch) -> None:
    """A progress bar without a total (``gradient features: 0it``) gives no ETA."""
    import datasteer.ops.embeddings as embeddings_module
    import datasteer.ops.gradients as gradients_module

    totals: list[int | None] = []

    def recording_tqdm(iterable: Any = None, *args: Any, total: int | None = None, **kwargs: Any) -> Any:
        totals.append(total)
        return iterable

    monkeypatch.setattr(embeddings_module, "tqdm", recording_tqdm)
    monkeypatch.setattr(gradients_module, "tqdm", recording_tqdm)
    ops, _ = ops_for(ragged_dataset(), batch_size=4)
    ops.embeddings(range(10))
    ops.gradient_features(range(10), GradFeatureConfig(method="vmap", proj_dim=8))
    assert totals == [3, 3]


def test_pool_features_are_written_under_the_run_output_directory(tmp_path: Path) -> None:
    """A system /tmp may be small or in memory; the store's directory is made if missing."""
    from tests.integrations.test_hf_trainer import build

    out = tmp_path / "run"
    trainer = build(out, {"paradigm": "select", "algorithm": "loss"}, args=training_args(out, max_steps=1))
    ops = trainer._steering_ops(trainer.get_train_dataloader())
    assert ops.scratch_dir == str(out)
    with ops.embedding_store(range(4)) as store:
        assert store.path.parent.parent == out
