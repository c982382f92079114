"""Sharding detection, batch padding and hook suspension (the multi-process runs are in tests/distributed)."""

from __future__ import annotations

import torch
from torch import nn

from datasteer.ops.sharding import _without_forward_hooks, full_parameters, padded_batch_count, param_sharding
from tests.factories import make_model


def test_plain_model_is_not_sharded_and_full_parameters_is_a_no_op() -> None:
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    assert param_sharding(model) == "none"
    with full_parameters(model):
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_padded_batch_count_is_the_largest_share_in_batches() -> None:
    # 19 samples over 2 ranks: shares 10 and 9, batches of 4 -> 3 and 3; of 5 -> 2 and 2.
    assert padded_batch_count(19, 2, 4) == 3
    assert padded_batch_count(19, 2, 5) == 2
    # 17 over 2: shares 9 and 8, batches of 4 -> rank 0 needs 3, rank 1 only 2: both run 3.
    assert padded_batch_count(17, 2, 4) == 3
    assert padded_batch_count(1, 4, 8) == 1  # ranks 1..3 have no sample but still run one batch
    assert padded_batch_count(0, 2, 4) == 0
    assert padded_batch_count(10, 1, 4) == 3


def _engine_hook(module: nn.Module, args: tuple[object, ...]) -> None:
    module.calls.append("engine")  # type: ignore[operator]


def _user_hook(module: nn.Module, args: tuple[object, ...]) -> None:
    module.calls.append("user")  # type: ignore[operator]


def test_only_the_engine_hooks_are_suspended_and_come_back_in_order() -> None:
    _engine_hook.__module__ = "fakeengine.hooks"
    layer = nn.Linear(2, 2)
    layer.calls = []  # type: ignore[assignment]
    layer.register_forward_pre_hook(_engine_hook)
    layer.register_forward_pre_hook(_user_hook)
    layer.register_forward_pre_hook(_engine_hook)
    model = nn.Sequential(layer)
    with _without_forward_hooks(model, "fakeengine."):
        model(torch.zeros(1, 2))
    assert layer.calls == ["user"]
    layer.calls.clear()
    model(torch.zeros(1, 2))
    assert layer.calls == ["engine", "user", "engine"]
