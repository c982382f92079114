"""The test double of the model operations: it is a ModelOperations, answers by row, records calls."""

from __future__ import annotations

import pytest
import torch

from datasteer.errors import SteeringStateError
from datasteer.ops.protocol import ModelOperations
from tests.fakes import FakeOps


def test_fake_ops_is_model_operations_and_subsets_by_row() -> None:
    target = FakeOps(embeddings=torch.eye(2), name="t")
    # Annotated: mypy checks FakeOps against the Protocol here.
    ops: ModelOperations = FakeOps(
        losses=torch.tensor([0.0, 1.0, 2.0, 3.0]), reference_losses=torch.tensor([5.0, 6.0, 7.0, 8.0]), targets=[target]
    )
    part = ops.subset([3, 1])
    assert part.sample_losses([0, 1]).tolist() == [3.0, 1.0]
    assert part.reference_losses([1, 0]).tolist() == [6.0, 8.0]
    assert part.dataset == [3, 1] and part.targets[0] is target
    assert ops.target_embeddings().tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_calls_are_recorded_and_rounds_are_read_in_order() -> None:
    ops = FakeOps(losses=[torch.tensor([1.0, 2.0]), torch.tensor([5.0, 7.0])])
    assert ops.sample_losses(torch.tensor([1])).tolist() == [2.0]
    assert ops.sample_losses(range(2), desc="later").tolist() == [5.0, 7.0]
    assert [(c.indices, c.options["desc"]) for c in ops.calls_to("sample_losses")] == [
        ([1], "per-sample loss"),
        ([0, 1], "later"),
    ]
    with pytest.raises(AssertionError, match="called 3 times, answers for 2"):
        ops.sample_losses([0])
    with pytest.raises(AssertionError, match="no answers for embeddings"):
        ops.embeddings([0])
    with pytest.raises(SteeringStateError, match="evaluation set"):
        ops.target_embeddings()
    with pytest.raises(ValueError, match="one row per data set row"):
        FakeOps(losses=torch.zeros(3), embeddings=torch.zeros(2, 4))
