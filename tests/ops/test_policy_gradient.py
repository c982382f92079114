"""NICE's reward-weighted policy-gradient features, against hand and direct computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import default_data_collator

from datasteer.errors import ConfigError
from datasteer.ops import ModelOps
from datasteer.ops.gradients import GradFeatureConfig, trainable_parameters
from datasteer.ops.policy_gradient import (
    Sampling,
    load_policy,
    policy_gradient_features,
    response_weights,
    sample_responses,
)
from datasteer.ops.projection import ParamLayout, StreamingProjection
from datasteer.ops.rewards import split_prompt_response
from datasteer.rng import derive_seed
from tests.factories import VOCAB, make_dataset, make_model, make_sft_dataset

EOS = frozenset({2})
CONFIG = GradFeatureConfig(method="vmap", proj_dim=64, seed=3, normalize=False)


def even_tokens(prompt: list[int], responses: list[list[int]], reference: list[int]) -> torch.Tensor:
    """A test reward: how many even ids a response has (varied, so the weights differ)."""
    return torch.tensor([float(sum(t % 2 == 0 for t in r)) for r in responses])


def test_response_weights_by_hand() -> None:
    rewards, lengths = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0])
    plain = response_weights(rewards, lengths, 1.0, Sampling(baseline="none"))
    assert plain.tolist() == [0.5, 0.0, 1.0, 0.0, 0.0]  # r |y| / M, reference unused
    mean = response_weights(rewards, lengths, 1.0, Sampling(baseline="mean"))
    assert mean.tolist() == [0.25, -0.375, 0.5, -0.625, 0.0]  # (r - 0.5) |y| / 4
    zeros = torch.zeros(4)
    # no sampled signal: the reference stands in with (r_ref - b) |y_ref|, or nothing without the fallback
    assert response_weights(zeros, lengths, 1.0, Sampling()).tolist() == [0, 0, 0, 0, 6.0]
    assert response_weights(zeros, lengths, 1.0, Sampling(reference_fallback=False)).tolist() == [0] * 5
    solved = response_weights(torch.ones(4), lengths, 1.0, Sampling(baseline="mean"))
    assert solved.tolist() == [0] * 5  # every sample already right: nothing to improve


# ----------------------------------------------------------------------------- sampling and features


def test_sampling_is_seeded_and_leaves_global_rng() -> None:
    model = make_model()
    sampling = Sampling(mc_samples=5, max_new_tokens=6)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    prompts = [[3, 4, 5], [7]]
    first = sample_responses(model, prompts, sampling, 11, EOS)
    assert torch.equal(torch.get_rng_state(), before)
    assert first == sample_responses(model, prompts, sampling, 11, EOS)
    assert first != sample_responses(model, prompts, sampling, 12, EOS)
    assert [len(r) for r in first] == [5, 5] and all(1 <= len(y) <= 6 for r in first for y in r)
    # With half the vocabulary as EOS ids, responses end early, right after their first EOS.
    half = frozenset(range(VOCAB // 2))
    short = [y for r in sample_responses(model, prompts, sampling, 11, half) for y in r]
    assert all(min(y[:-1], default=VOCAB) >= VOCAB // 2 for y in short)
    assert any(len(y) < 6 and y[-1] in half for y in short)


def test_left_padded_batch_samples_like_one_prompt_alone() -> None:
    """Greedy-like sampling (a tiny top_k = 1) shows that padding does not change a prompt's continuation."""
    model = make_model()
    greedy = Sampling(mc_samples=2, max_new_tokens=5, top_k=1)
    together = sample_responses(model, [[3, 4, 5, 6], [7]], greedy, 0, EOS)
    assert together[1] == sample_responses(model, [[7]], greedy, 0, EOS)[0]


def direct_feature(
    model: torch.nn.Module,
    prompt: list[int],
    responses: list[list[int]],
    baseline: str,
    rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """-(1/M) sum_m (r_m - b) grad log pi(y_m | x), from summed log-probabilities, then projected
    (rewards: ``even_tokens`` unless given)."""
    params = trainable_parameters(model)
    rewards = even_tokens(prompt, responses, []) if rewards is None else rewards
    b = rewards.mean() if baseline == "mean" else 0.0
    objective = torch.zeros(())
    for r, y in zip(rewards, responses, strict=True):
        logits = model(input_ids=torch.tensor([prompt + y])).logits[0, len(prompt) - 1 : -1]
        log_pi = F.log_softmax(logits, dim=-1).gather(1, torch.tensor(y)[:, None]).sum()
        objective = objective + (r - b) * log_pi / len(responses)
    grads = torch.autograd.grad(-objective, list(params.values()))
    layout = ParamLayout.from_named(params.items())
    return layout.project(
        {n: g[None] for n, g in zip(params, grads, strict=True)}, StreamingProjection(CONFIG.proj_dim, CONFIG.seed)
    )[0]


@pytest.mark.parametrize("baseline", ["none", "mean"])
def test_features_equal_the_projected_policy_gradient(baseline: str) -> None:
    model = make_model()
    targets = [([3, 4, 5], [6, 2]), ([9, 10], [11, 12, 2]), ([20, 21, 22, 23], [2])]
    sampling = Sampling(mc_samples=4, max_new_tokens=5, baseline=baseline)  # type: ignore[arg-type]
    got, no_signal = policy_gradient_features(
        model, targets, [0, 1, 2], CONFIG, reward=even_tokens, sampling=sampling, seed=5, group_size=2
    )
    assert got.shape == (3, CONFIG.proj_dim)
    assert no_signal.tolist() == [False, False, False]
    sampled = [
        *sample_responses(model, [[3, 4, 5], [9, 10]], sampling, derive_seed(5, "nice", 0, 1), EOS),
        *sample_responses(model, [[20, 21, 22, 23]], sampling, derive_seed(5, "nice", 2), EOS),
    ]
    for key, ((prompt, _), responses) in enumerate(zip(targets, sampled, strict=True)):
        assert even_tokens(prompt, responses, []).std() > 0  # the weights are not trivial
        direct = direct_feature(model, prompt, responses, baseline)
        assert (got[key] - direct).norm() <= 1e-5 * direct.norm()
    # The same seed gives the same rows, another seed other rows.
    again = policy_gradient_features(
        model, targets, [0, 1, 2], CONFIG, reward=even_tokens, sampling=sampling, seed=5, group_size=2
    )
    assert torch.equal(again.features, got)
    other = policy_gradient_features(
        model, targets, [0, 1, 2], CONFIG, reward=even_tokens, sampling=sampling, seed=6, group_size=2
    )
    assert not torch.allclose(other.features, got)


@pytest.mark.parametrize("fallback", [True, False])
def test_targets_without_sampled_signal_are_flagged(fallback: bool) -> None:
    """Every sampled response gets reward 0 (the reference 1): no sampled signal. With the
    fallback the row is the reference answer's loss gradient, else zeros; flagged either way."""
    model = make_model()
    targets = [([3, 4, 5], [6, 2]), ([9, 10], [11, 12, 2])]

    def only_reference(prompt: list[int], responses: list[list[int]], reference: list[int]) -> torch.Tensor:
        return torch.tensor([0.0] * (len(responses) - 1) + [1.0])  # the reference comes last

    sampling = Sampling(mc_samples=3, max_new_tokens=4, reference_fallback=fallback)
    got = policy_gradient_features(
        model, targets, [0, 1], CONFIG, reward=only_reference, sampling=sampling, seed=5, group_size=2
    )
    assert got.no_signal.tolist() == [True, True]
    if fallback:
        reference = direct_feature(model, targets[0][0], [targets[0][1]], "none", torch.ones(1))
        assert (got.features[0] - reference).norm() <= 1e-5 * reference.norm()
    else:
        assert got.features.abs().sum() == 0
    with pytest.raises(ValueError, match="normalize=False"):
        policy_gradient_features(
            model, targets, [0], GradFeatureConfig(), reward=even_tokens, sampling=sampling, seed=5, group_size=1
        )


def test_single_token_reward_feature_is_minus_the_exact_reward_gradient() -> None:
    """r = [y = a] with one-token responses: J = p_a exactly, and the estimate is
    (n_a / M) grad(-log p_a) = -(n_a / (M p_a)) grad p_a, parallel to -grad J (the sign LESS's
    loss gradients have), for any number n_a > 0 of samples that hit a."""
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a peaked next-token distribution, so some samples hit a
    prompt, m = [3, 4, 5], 32
    params = trainable_parameters(model)
    probs = F.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], dim=-1)
    a = int(probs.argmax())
    sampling = Sampling(mc_samples=m, max_new_tokens=1)
    (responses,) = sample_responses(model, [prompt], sampling, derive_seed(0, "nice", 0), EOS)
    hits = sum(r == [a] for r in responses)
    assert 0 < hits < m

    def hit_a(prompt: list[int], responses: list[list[int]], reference: list[int]) -> torch.Tensor:
        return torch.tensor([float(r == [a]) for r in responses])

    config = GradFeatureConfig(method="loop", proj_dim=128, seed=1, normalize=False)
    got = policy_gradient_features(
        model, [(prompt, [a])], [0], config, reward=hit_a, sampling=sampling, seed=0, group_size=1
    ).features[0]
    grads = torch.autograd.grad(probs[a], list(params.values()))
    minus_grad_j = -ParamLayout.from_named(params.items()).project(
        {n: g[None] for n, g in zip(params, grads, strict=True)}, StreamingProjection(128, 1)
    )[0]
    expected = hits / (m * probs[a].detach()) * minus_grad_j
    assert (got - expected).norm() <= 1e-5 * expected.norm()


def test_local_policy_is_frozen_and_must_share_the_vocabulary(tmp_path: Path) -> None:
    make_model().save_pretrained(tmp_path / "policy")
    policy = load_policy(tmp_path / "policy", device=torch.device("cpu"), vocab_size=VOCAB)
    assert not policy.training and not any(p.requires_grad for p in policy.parameters())
    with pytest.raises(ValueError, match="vocabulary"):
        load_policy(tmp_path / "policy", device=torch.device("cpu"), vocab_size=VOCAB * 2)


# ----------------------------------------------------------------------------- model operations


def test_model_ops_rows_equal_the_direct_function_and_reject_pretraining_rows() -> None:
    model = make_model()
    data = make_sft_dataset(sizes=(0, 0, 5), seed=2).remove_columns("domain")
    ops = ModelOps(model, data, default_data_collator, 7, torch.device("cpu"), name="arith")
    sampling = Sampling(mc_samples=2, max_new_tokens=3)  # 7 // 3 = 2 targets per batch
    got = ops.policy_gradient_features([4, 1, 2], CONFIG, reward=even_tokens, sampling=sampling, seed=9)
    rows = [split_prompt_response(data[i]) for i in (4, 1, 2, 4)]  # the last group filled up with row 4
    direct = policy_gradient_features(
        model, rows, [4, 1, 2, 4], CONFIG, reward=even_tokens, sampling=sampling, seed=9, group_size=2
    )
    torch.testing.assert_close(got.features, direct.features[:3])
    assert torch.equal(got.no_signal, direct.no_signal[:3])
    pretraining = ModelOps(model, make_dataset((0, 0, 3)), default_data_collator, 4, torch.device("cpu"), name="pt")
    with pytest.raises(ConfigError, match=r"row 0 of evaluation set 'pt'.*no prompt"):
        pretraining.policy_gradient_features([0], CONFIG, reward=even_tokens, sampling=sampling, seed=9)
