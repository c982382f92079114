"""NICE's target features: projected reward-weighted policy gradients of sampled responses.

For each target (a prompt ``x`` and its reference answer), :func:`policy_gradient_features`
samples ``M = mc_samples`` responses from the policy (in batches of targets, each seeded
by its targets' keys), scores them with a reward (:mod:`datasteer.ops.rewards`) and
returns the projected gradient ``sum_m w_m grad l_m`` of the responses' token-mean
losses ``l_m``, with ``w_m = (r_m - b) |y_m| / M`` (:func:`response_weights`). As
``log pi(y | x) = -|y| l(y)`` and the projection is linear, this is exactly the
projection of ``-(1/M) sum_m (r_m - b) grad log pi(y_m | x)``, the Monte-Carlo estimate
of minus the gradient of the expected reward (a descent direction, like a loss gradient).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from datasteer import dist
from datasteer.ops.gradients import GradFeatureConfig, grad_features
from datasteer.ops.hub import local_files_only
from datasteer.ops.losses import IGNORE_INDEX
from datasteer.ops.rewards import RewardFn, Target, eos_ids
from datasteer.ops.sharding import param_sharding
from datasteer.rng import derive_seed

logger = logging.getLogger(__name__)

Baseline = Literal["none", "mean"]


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled and weighted (see :func:`policy_gradient_features`)."""

    mc_samples: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    baseline: Baseline = "none"
    reference_fallback: bool = True


@torch.no_grad()
def sample_responses(
    policy: nn.Module, prompts: Sequence[list[int]], sampling: Sampling, seed: int, eos: frozenset[int]
) -> list[list[list[int]]]:
    """``mc_samples`` responses to each prompt, in one left-padded batch.

    Each response is cut right after its first EOS (kept: stopping is part of the
    response). The draws use the global RNG (transformers has no generator argument), so
    they run in a forked RNG seeded with ``seed``; the caller's RNG state is unchanged.

    With sharded parameters (DeepSpeed ZeRO-3, FSDP2) every forward gathers parameters
    collectively, so a rank whose responses all end early must keep stepping until every
    rank's have: ``generate`` runs with ``synced_gpus`` (it all-reduces "finished" each step
    and runs dummy forwards meanwhile). transformers turns that on by itself only under
    FSDP or when its own DeepSpeed config is live (a ``Trainer`` run), not for an engine
    built with ``deepspeed.initialize``; so it is set here. Every rank must then make the
    same number of calls (:meth:`datasteer.ops.ModelOps.policy_gradient_features` does).
    """
    device = next(policy.parameters()).device
    synced = dist.is_distributed() and param_sharding(policy) != "none"
    width = max(len(p) for p in prompts)
    pad = min(eos)  # only ever masked out
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = policy.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            num_return_sequences=sampling.mc_samples,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            pad_token_id=pad,
            eos_token_id=sorted(eos),
            synced_gpus=synced,
        )
    responses = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        responses.append(row[:end])
    m = sampling.mc_samples
    return [responses[i * m : (i + 1) * m] for i in range(len(prompts))]  # generate keeps a prompt's rows together


class PolicyGradientFeatures(NamedTuple):
    """What :func:`policy_gradient_features` returns.

    Attributes:
        features: ``(n, k)`` float32 rows, one per target.
        no_signal: ``(n,)`` bool, True for a target whose sampled responses all got weight 0
            (every reward 0, or all equal under a baseline): its row is its reference
            answer's (``reference_fallback``) or zeros.
    """

    features: torch.Tensor
    no_signal: torch.Tensor


def response_weights(
    rewards: torch.Tensor, lengths: torch.Tensor, reference_reward: float, sampling: Sampling
) -> torch.Tensor:
    """Weights of the ``M`` sampled responses and, last, the reference answer.

    Sampled response ``m`` gets ``(r_m - b) |y_m| / M`` with ``b = 0`` (``baseline:
    none``) or the mean reward of the ``M`` samples (``mean``; the leave-one-out baseline
    up to a factor ``M / (M - 1)``, which cosine scoring ignores). The reference gets 0,
    unless every sampled weight is 0 (no signal: all rewards 0, or all equal with a
    baseline) and ``reference_fallback`` is on: then it gets ``(r_ref - b) |y_ref|``
    (the reference answer treated as the one informative response).

    Args:
        rewards: ``(M,)`` rewards of the samples.
        lengths: ``(M + 1,)`` response lengths in tokens, the reference's last.
        reference_reward: the reward of the reference answer.
        sampling: the baseline and fallback settings.
    """
    m = rewards.numel()
    b = rewards.mean() if sampling.baseline == "mean" else rewards.new_zeros(())
    weights = torch.zeros(m + 1, dtype=torch.float32)
    weights[:m] = (rewards - b) * lengths[:m] / m
    if sampling.reference_fallback and not weights[:m].any():
        weights[m] = (reference_reward - b) * lengths[m]
    return weights


def _response_batch(rows: list[Target]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` of (prompt, response) pairs."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        ids[i, :n] = torch.tensor(prompt + response)
        mask[i, :n] = 1
        labels[i, len(prompt) : n] = torch.tensor(response)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def policy_gradient_features(
    model: nn.Module,
    targets: Sequence[Target],
    keys: Sequence[int],
    config: GradFeatureConfig,
    *,
    reward: RewardFn,
    sampling: Sampling,
    seed: int,
    group_size: int,
    policy: nn.Module | None = None,
) -> PolicyGradientFeatures:
    """Projected reward-weighted policy gradients, one row per target (module docstring).

    Args:
        model: the model whose gradients are taken (the live model).
        targets: ``(prompt, reference)`` ids of each target.
        keys: a stable key per target (its index in its set): the responses of the group
            of targets ``i..j`` are sampled in one batch seeded with
            ``derive_seed(seed, "nice", *keys[i:j])``.
        config: the projection; ``normalize`` must be off, so that rows combine linearly.
        reward: scores each target's responses and its reference.
        sampling: sampling, baseline and fallback settings.
        seed: base seed of the draws.
        group_size: targets per sampling batch and per gradient batch (which holds their
            ``mc_samples`` responses and reference each).
        policy: the model that samples (``None``: ``model``).

    Returns:
        ``(len(targets), k)`` float32 CPU rows (a target without signal gets its reference's
        row under ``reference_fallback``, else zeros) and which targets had no sampled signal.
    """
    if config.normalize:
        raise ValueError("policy_gradient_features combines rows linearly; pass normalize=False")
    sampler = policy if policy is not None else model
    eos = eos_ids(sampler)
    batches: list[dict[str, torch.Tensor]] = []
    weights: list[torch.Tensor] = []
    mean_rewards: list[float] = []
    was_training = sampler.training
    sampler.eval()
    try:
        starts = range(0, len(targets), group_size)
        for start in tqdm(starts, desc="NICE sampling", unit="group", disable=dist.rank() != 0, leave=False):
            pairs: list[Target] = []
            group = targets[start : start + group_size]
            group_seed = derive_seed(seed, "nice", *keys[start : start + group_size])
            sampled = sample_responses(sampler, [prompt for prompt, _ in group], sampling, group_seed, eos)
            for (prompt, reference), responses in zip(group, sampled, strict=True):
                scores = reward(prompt, [*responses, reference], reference).float()
                lengths = torch.tensor([len(r) for r in [*responses, reference]], dtype=torch.float32)
                weights.append(response_weights(scores[:-1], lengths, float(scores[-1]), sampling))
                mean_rewards.append(float(scores[:-1].mean()))
                # Every response's gradient is computed, whatever its weight, so the work (and,
                # under sharded parameters, the collective calls) never depends on rewards.
                pairs += [(prompt, r) for r in [*responses, reference]]
            batches.append(_response_batch(pairs))
    finally:
        sampler.train(was_training)
    no_signal = torch.tensor([not bool(w[:-1].any()) for w in weights], dtype=torch.bool)
    logger.info(
        "NICE: %d targets, mean sampled reward %.4f, %d without sampled signal",
        len(weights),
        sum(mean_rewards) / max(len(mean_rewards), 1),
        int(no_signal.sum()),
    )
    feats = grad_features(model, batches, config, desc="NICE gradients")
    per = sampling.mc_samples + 1
    rows = [w @ feats[i * per : (i + 1) * per] for i, w in enumerate(weights)]
    return PolicyGradientFeatures(torch.stack(rows) if rows else torch.empty(0, 0), no_signal)


def load_policy(path: str | Path, *, device: torch.device, vocab_size: int) -> nn.Module:
    """Load a local causal LM that only samples responses (frozen, eval mode).

    Raises:
        ValueError: its vocabulary has another size than the trained model's
            (``vocab_size``): their token ids must mean the same.
    """
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=local_files_only())
    model = model.to(device)
    size = model.get_input_embeddings().num_embeddings
    if size != vocab_size:
        raise ValueError(
            f"policy {path} has a vocabulary of {size} ids, the trained model {vocab_size}: "
            "it must use the trained model's tokenizer"
        )
    result: nn.Module = model.eval().requires_grad_(False)
    return result
