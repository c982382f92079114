"""Tests of datasteer.ops.losses against a hand computation with cross_entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from datasteer.ops.losses import IGNORE_INDEX, per_sample_loss, per_token_loss
from datasteer.rng import torch_generator

V = 7


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch_generator(0, "test-losses")
    logits = torch.randn(3, 5, V, generator=gen)
    labels = torch.randint(V, (3, 5), generator=gen)
    labels[0, 0] = IGNORE_INDEX  # position 0 is never a target (the shift drops it)
    labels[1, 2] = IGNORE_INDEX
    labels[1, 4] = IGNORE_INDEX
    labels[2, 1:] = IGNORE_INDEX  # sample 2 has no labelled target at all
    return logits, labels


def test_per_token_loss_is_shifted_cross_entropy() -> None:
    logits, labels = batch()
    losses, mask = per_token_loss(logits, labels)
    assert losses.shape == mask.shape == (3, 4)
    assert mask.dtype == torch.bool
    for i in range(3):
        for t in range(4):
            target = int(labels[i, t + 1])
            if target == IGNORE_INDEX:
                assert not mask[i, t] and float(losses[i, t]) == 0.0
            else:
                # -log softmax(logits at t)[label at t + 1], written out.
                expected = -float(torch.log_softmax(logits[i, t], dim=-1)[target])
                assert mask[i, t]
                assert math.isclose(float(losses[i, t]), expected, rel_tol=1e-5, abs_tol=1e-6)


def test_mask_follows_ignore_index() -> None:
    _, labels = batch()
    _, mask = per_token_loss(*batch())
    assert mask.tolist() == [
        [True, True, True, True],
        [True, False, True, False],
        [False, False, False, False],
    ]
    assert torch.equal(mask, labels[:, 1:] != IGNORE_INDEX)


def test_per_sample_loss_is_the_mean_over_labelled_tokens() -> None:
    logits, labels = batch()
    losses, counts = per_sample_loss(logits, labels)
    assert counts.tolist() == [4, 2, 0]
    for i in range(2):
        expected = F.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=IGNORE_INDEX)
        assert math.isclose(float(losses[i]), float(expected), rel_tol=1e-5)
    assert float(losses[2]) == 0.0  # no labelled token: loss 0, not nan


def test_token_weighted_mean_equals_the_standard_loss() -> None:
    logits, labels = batch()
    losses, counts = per_sample_loss(logits, labels)
    standard = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    weighted = (losses * counts).sum() / counts.sum()
    assert math.isclose(float(weighted), float(standard), rel_tol=1e-5)


def test_losses_are_float32_and_differentiable() -> None:
    logits, labels = batch()
    logits = logits.to(torch.bfloat16).requires_grad_()
    losses, _ = per_sample_loss(logits, labels)
    assert losses.dtype == torch.float32
    losses.sum().backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape
    assert float(logits.grad[2].abs().sum()) == 0.0  # a sample without targets contributes no gradient
