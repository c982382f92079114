"""NICE: LESS with the target gradient replaced by a policy-gradient estimate of a reward's gradient."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from datasteer.config import doc
from datasteer.errors import ConfigError, NonFiniteInputError
from datasteer.finite import finite_rows
from datasteer.ops.feature_store import FeatureStore
from datasteer.ops.hub import require_local
from datasteer.ops.policy_gradient import Sampling, load_policy
from datasteer.ops.rewards import ExactMatch, RewardFn, RewardModel, TokenF1, eos_ids
from datasteer.registry import SELECTORS
from datasteer.selectors.base import SelectContext, Selector, candidate_subset
from datasteer.selectors.less import GradientFeatureParams, finite_scores, top_finite

if TYPE_CHECKING:
    from datasteer.ops.protocol import ModelOperations

logger = logging.getLogger(__name__)

REWARDS = ("exact_match", "token_f1", "model")


@dataclass
class NiceParams(GradientFeatureParams):
    """Parameters of :class:`NiceSelector`."""

    reward: str = doc(
        "Reward of a sampled response: exact_match or token_f1 (token ids vs the reference answer, "
        "up to EOS), or model (the reward_model directory).",
        default="exact_match",
    )
    reward_model: str | None = doc(
        "Local AutoModelForSequenceClassification directory (one output, the policy's tokenizer) "
        "scoring prompt + response; only with reward: model.",
        default=None,
    )
    policy: str | None = doc(
        "Local causal LM directory that samples the responses (null: the model being trained).", default=None
    )
    mc_samples: int = doc("Responses sampled per target prompt, M (paper: 20).", default=8)
    max_new_tokens: int = doc("Cap on each sampled response's length in tokens.", default=64)
    temperature: float = doc("Sampling temperature (> 0).", default=1.0)
    top_k: int = doc("Sample from the k most likely tokens (0: no cut; paper: 50).", default=0)
    top_p: float = doc("Nucleus sampling mass (1.0: no cut; paper: 0.95).", default=1.0)
    baseline: str = doc(
        "Reward baseline: none (the paper's estimator) or mean (subtract the prompt's mean sampled reward).",
        default="none",
    )
    reference_fallback: bool = doc(
        "When no sampled response of a target carries signal, use its reference answer (the authors' "
        "'worst-case protection' option); off: such targets are left out, as in the paper's plain estimator.",
        default=True,
    )
    candidates: int | None = doc(
        "Score a fresh random subset of this many pool samples per update (null: all).", default=None
    )
    targets: int | None = doc(
        "Sample responses for a fresh random subset of this many rows of each target set per update (null: all).",
        default=None,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward not in REWARDS:
            raise ConfigError(f"reward: {self.reward!r} is not allowed; choose one of {', '.join(map(repr, REWARDS))}")
        if (self.reward == "model") != (self.reward_model is not None):
            raise ConfigError("reward_model: give a directory exactly when reward is 'model'")
        for key in ("reward_model", "policy"):
            path = getattr(self, key)
            if path is not None:
                require_local(path, key)
        for key in ("mc_samples", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0 (responses are sampled), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.baseline not in ("none", "mean"):
            raise ConfigError(f"baseline: {self.baseline!r} is not allowed; choose one of 'none', 'mean'")
        for key in ("candidates", "targets"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1 or null, got {getattr(self, key)}")


@SELECTORS.register("nice")
class NiceSelector(Selector):
    """NICE (Wang et al., ICML 2025, PMLR 267; openreview.net/forum?id=2wt8m5HUBs): LESS against a reward's policy gradient.

    The target of LESS is a loss gradient; NICE targets a non-differentiable reward
    ``r`` (exact match, token F1, a reward model) instead. For a target prompt ``x``,
    ``J(theta) = E_{y ~ pi_theta(.|x)} r(x, y)`` has the score-function gradient
    ``grad J = E[r grad log pi(y | x)] ~ (1/M) sum_m (r_m - b) grad log pi(y_m | x)``
    over ``M = mc_samples`` responses sampled from the policy (``b``: the baseline, 0 in
    the paper). A candidate's training step moves the parameters by ``-eta u`` (``u``: its
    Adam-preconditioned loss gradient, as in LESS), which changes ``J`` by about
    ``-eta <u, grad J>``. So the target feature is ``g = -grad J``, i.e.
    ``(1/M) sum_m (r_m - b) |y_m| grad l(y_m)`` with ``l`` the token-mean loss of the
    response (``log pi = -|y| l``): the reward-weighted loss gradient, a descent
    direction exactly like LESS's target loss gradient, and a high cosine ``<u, g>``
    means the candidate's step raises the expected reward. The projection is linear, so
    the unnormalised projected response gradients are combined with those weights
    before normalising: the projected ``g`` is exact.

    Targets are the evaluation sets' tokenised prompt/response rows (the prompt is the
    prefix before the first labelled token, the reference answer the labelled tokens).
    Each update samples fresh responses (seeded from the update's generator, the same on
    every rank) from the live model or from ``policy``, for every target row or a fresh
    random subset of ``targets`` rows per set. Every response's gradient is computed,
    whatever its reward. Targets whose responses all get the same reward carry no
    direction: with ``reference_fallback`` the reference answer stands in for them (the
    authors' "worst-case protection" option), otherwise they are left out. A candidate's
    score is its mean cosine with the target set's features, maximised over target sets
    (as in LESS); the top ``num_samples`` are selected.
    """

    Params = NiceParams
    needs_model = True

    def __init__(self, params: NiceParams) -> None:
        super().__init__(params)
        # Loaded once on first use; frozen resources, not training state.
        self._policy: nn.Module | None = None
        self._reward_model: RewardModel | None = None
        self._report: dict[str, int | float] = {}

    def report(self) -> dict[str, int | float]:
        """``targets``: target rows sampled at the latest update; ``targets_without_signal``:
        those whose sampled responses all got the same reward (under ``reference_fallback``
        their reference answers stood in, otherwise they were left out)."""
        return dict(self._report)

    def _sampler(self, ops: ModelOperations) -> nn.Module | None:
        p: NiceParams = self.params
        if p.policy is not None and self._policy is None:
            vocab = ops.model.get_input_embeddings().num_embeddings  # type: ignore[operator]
            try:
                self._policy = load_policy(p.policy, device=ops.device, vocab_size=int(vocab))
            except ValueError as err:
                raise ConfigError(f"policy: {err}") from err
        return self._policy

    def _reward(self, ops: ModelOperations, sampler: nn.Module) -> RewardFn:
        p: NiceParams = self.params
        if p.reward == "exact_match":
            return ExactMatch(eos_ids(sampler))
        if p.reward == "token_f1":
            return TokenF1(eos_ids(sampler))
        if self._reward_model is None:
            assert p.reward_model is not None
            vocab = sampler.get_input_embeddings().num_embeddings  # type: ignore[operator]
            try:
                self._reward_model = RewardModel.load(p.reward_model, device=ops.device, vocab_size=int(vocab))
            except ValueError as err:
                raise ConfigError(f"reward_model: {err}") from err
        return self._reward_model

    def select(self, ctx: SelectContext) -> torch.Tensor:
        p: NiceParams = self.params
        ops = ctx.ops
        assert ops is not None
        if not ops.targets:
            raise ConfigError("nice: needs target prompts; give the run an evaluation set (eval_dataset, stage sft)")
        candidates = candidate_subset(ctx, p.candidates, keeps_top="nice")
        config = p.feature_config()
        with ops.gradient_feature_store(candidates, config, optimizer=ops.optimizer if p.adam else None) as pool:
            return self._select_from(ctx, pool, candidates)

    def _select_from(self, ctx: SelectContext, pool: FeatureStore, candidates: torch.Tensor) -> torch.Tensor:
        """The selection among ``candidates`` whose features (on disk) are ``pool``."""
        p: NiceParams = self.params
        ops = ctx.ops
        assert ops is not None
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
        config = p.feature_config()
        policy = self._sampler(ops)
        reward = self._reward(ops, policy if policy is not None else ops.model)
        sampling = Sampling(
            mc_samples=p.mc_samples,
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            baseline=p.baseline,  # type: ignore[arg-type]
            reference_fallback=p.reference_fallback,
        )
        sets = []
        total = silent = 0
        for t in ops.targets:
            n = len(t.dataset)
            rows = torch.arange(n)
            if p.targets is not None and p.targets < n:
                rows = torch.randperm(n, generator=ctx.generator)[: p.targets].sort().values
            feats, no_signal = t.policy_gradient_features(
                rows,
                replace(config, normalize=False),
                reward=reward,
                sampling=sampling,
                seed=seed,
                policy=policy,
            )
            total += len(feats)
            silent += int(no_signal.sum())
            # A zero row has no direction to align with; a non-finite one is left out (counted below).
            live = feats[~finite_rows(feats) | (feats.abs().sum(dim=1) > 0)]
            logger.info("nice: %d of %d targets of %s carry reward signal", len(live), len(feats), t.name or "eval")
            if len(live):
                sets.append(live)
        self._report = {"targets": total, "targets_without_signal": silent, "nonfinite": 0}
        if silent:
            instead = (
                "their reference answers stand in (reference_fallback: true): this update is LESS on them"
                if p.reference_fallback
                else "they are left out (reference_fallback: false)"
            )
            logger.warning(
                "nice: %d of %d targets got the same reward for all %d sampled responses (no signal); %s",
                silent,
                total,
                p.mc_samples,
                instead,
            )
        k = min(ctx.num_samples, len(candidates))
        if not sets:
            logger.warning("nice: no target carries reward signal; selecting candidates at random this update")
            return candidates[torch.randperm(len(candidates), generator=ctx.generator)[:k]]
        scores, left_out = finite_scores(pool, sets)
        self._report["nonfinite"] = left_out
        if scores is None:
            raise NonFiniteInputError(f"no finite gradient feature to score by ({left_out} rows are NaN or infinite)")
        return candidates[top_finite(scores, k)]
