"""NICE: scoring against direct cosines, the sign on a hand-checkable case, determinism, parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import default_data_collator

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError
from datasteer.ops import ModelOps
from datasteer.rng import torch_generator
from datasteer.selectors.nice import NiceParams, NiceSelector
from tests.factories import make_dataset, make_model, select_context, tiny_config
from tests.fakes import FakeOps, live_optimizer

POOL = torch.randn(12, 5, generator=torch_generator(1, "pool"))


def fake_ops(*target_sets: torch.Tensor) -> FakeOps:
    """The pool's gradient features are POOL; each target set's policy-gradient features
    are the given rows."""
    targets = [FakeOps(policy_gradients=t, name=f"set{i}") for i, t in enumerate(target_sets)]
    return FakeOps(gradients=POOL, targets=targets, model=make_model(), optimizer=live_optimizer())


def mean_cosine(targets: torch.Tensor) -> torch.Tensor:
    return (F.normalize(POOL, dim=1) @ F.normalize(targets, dim=1).T).mean(dim=1)


def test_top_k_by_mean_cosine_over_targets_with_signal_max_over_sets() -> None:
    a = torch.randn(3, 5, generator=torch_generator(2, "a"))
    b = torch.randn(2, 5, generator=torch_generator(3, "b"))
    with_zero = torch.cat([b, torch.zeros(1, 5)])  # a target without reward signal
    ops = fake_ops(a, with_zero)
    chosen = NiceSelector(NiceParams()).select(select_context(ops=ops, num_samples=4))
    best = torch.maximum(mean_cosine(a), mean_cosine(b))  # the zero row is left out, not averaged in
    assert chosen.tolist() == torch.topk(best, 4).indices.tolist()
    (pool,) = ops.calls
    assert pool.options["optimizer"] is ops.optimizer and pool.options["config"].normalize  # Adam-aware, normalised
    (t0,), (t1,) = (t.calls for t in ops.targets)
    assert not t0.options["config"].normalize and not t1.options["config"].normalize  # rows combine linearly
    assert t0.options["seed"] == t1.options["seed"]  # one sampling seed for the update


def test_a_set_without_signal_is_skipped_and_none_at_all_draws_at_random() -> None:
    a = torch.randn(2, 5, generator=torch_generator(4, "a"))
    chosen = NiceSelector(NiceParams(adam=False)).select(
        select_context(ops=fake_ops(a, torch.zeros(3, 5)), num_samples=5)
    )
    assert chosen.tolist() == torch.topk(mean_cosine(a), 5).indices.tolist()
    silent = [
        NiceSelector(NiceParams()).select(select_context(ops=fake_ops(torch.zeros(2, 5)), num_samples=5, update=u))
        for u in (0, 0, 1)
    ]
    assert len(set(silent[0].tolist())) == 5 and torch.equal(silent[0], silent[1])  # seeded by the update
    assert not torch.equal(silent[0], silent[2])


@pytest.mark.parametrize("fallback", [True, False])
def test_targets_without_signal_are_counted_and_warned_about(fallback: bool, caplog: pytest.LogCaptureFixture) -> None:
    a = torch.randn(3, 5, generator=torch_generator(5, "a"))
    a[1] = 0  # the fake's zero row: a target whose sampled responses carried no signal
    selector = NiceSelector(NiceParams(reference_fallback=fallback))
    assert selector.report() == {}
    with caplog.at_level("WARNING", logger="datasteer.selectors.nice"):
        selector.select(select_context(ops=fake_ops(a, torch.zeros(2, 5)), num_samples=4))
    assert selector.report() == {"targets": 5, "targets_without_signal": 3, "nonfinite": 0}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("nice: 3 of 5 targets got the same reward for all 8 sampled responses")
    assert ("reference answers stand in" in warning) is fallback
    caplog.clear()
    with caplog.at_level("WARNING", logger="datasteer.selectors.nice"):
        selector.select(select_context(ops=fake_ops(torch.ones(2, 5)), num_samples=4, update=1))
    assert selector.report() == {"targets": 2, "targets_without_signal": 0, "nonfinite": 0} and not caplog.records


def test_subsets_of_candidates_and_targets_are_fresh_per_update() -> None:
    ops = fake_ops(torch.randn(10, 5, generator=torch_generator(5, "t")))
    for update in (0, 1):
        NiceSelector(NiceParams(candidates=6, targets=4)).select(select_context(ops=ops, num_samples=3, update=update))
    first, second = (c.indices for c in ops.calls)
    assert len(first) == 6 and first == sorted(first) and first != second
    t0, t1 = ops.targets[0].calls
    assert len(t0.indices) == 4 and t0.indices == sorted(t0.indices) and t0.indices != t1.indices
    assert t0.options["seed"] != t1.options["seed"]
    with pytest.raises(ConfigError, match="evaluation set"):
        NiceSelector(NiceParams()).select(select_context(ops=fake_ops(), num_samples=3))


# ----------------------------------------------------------------------------- the live model


def one_token_rows(prompt: list[int], answers: list[int]) -> Dataset:
    rows = [[*prompt, a] for a in answers]
    return Dataset.from_dict(
        {
            "input_ids": rows,
            "attention_mask": [[1] * len(r) for r in rows],
            "labels": [[-100] * len(prompt) + [a] for a in answers],
        }
    )


def test_candidate_whose_step_raises_the_reward_wins() -> None:
    """Reward: the one-token answer is a. The candidate "prompt -> a" has loss gradient
    -grad log p_a, exactly parallel to NICE's target -grad p_a (cosine 1), so it must rank
    first; its SGD step raises p_a, the expected reward. The sign matters: with the opposite
    convention it would rank last."""
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked, so sampled answers hit a
    prompt = [3, 4, 5]
    a = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
    answers = [a, *[t for t in range(20, 30) if t != a][:9]]
    pool = one_token_rows(prompt, answers)
    target = ModelOps(model, one_token_rows(prompt, [a]), default_data_collator, 8, torch.device("cpu"), name="t")
    ops = ModelOps(model, pool, default_data_collator, 8, torch.device("cpu"), targets=[target])
    params = NiceParams(mc_samples=32, max_new_tokens=1, adam=False, proj_dim=4096, reference_fallback=False)
    chosen = NiceSelector(params).select(select_context(ops=ops, num_samples=10, pool_size=len(pool)))
    assert chosen[0] == 0
    again = NiceSelector(params).select(select_context(ops=ops, num_samples=10, pool_size=len(pool)))
    assert torch.equal(chosen, again)  # deterministic for a fixed seed

    # A small SGD step on the winner raises the expected reward p_a; on the last-ranked one it lowers it.
    def reward_after_step(row: int) -> float:
        trial = make_model()
        trial.load_state_dict(model.state_dict())
        batch = default_data_collator([pool[row]])
        trial(**batch).loss.backward()
        with torch.no_grad():
            for p in trial.parameters():
                p -= 1e-3 * p.grad  # small, so the first-order picture holds
            return float(F.softmax(trial(input_ids=torch.tensor([prompt])).logits[0, -1], dim=-1)[a])

    with torch.no_grad():
        before = float(F.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], dim=-1)[a])
    assert reward_after_step(int(chosen[0])) > before > reward_after_step(int(chosen[-1]))


def test_pretraining_targets_are_a_clear_error() -> None:
    model = make_model()
    target = ModelOps(model, make_dataset((0, 0, 3)), default_data_collator, 4, torch.device("cpu"), name="arith")
    ops = ModelOps(model, make_dataset((4, 4, 4)), default_data_collator, 4, torch.device("cpu"), targets=[target])
    with pytest.raises(ConfigError, match=r"'arith'.*no prompt.*stage: sft"):
        NiceSelector(NiceParams(adam=False, mc_samples=2)).select(select_context(ops=ops, num_samples=4, pool_size=12))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"reward": "bleu"}, "reward: 'bleu' is not allowed"),
        ({"reward": "model"}, "reward_model: give a directory exactly when reward is 'model'"),
        ({"reward_model": "/nowhere"}, "reward_model: give a directory exactly when"),
        ({"reward": "model", "reward_model": "/nowhere"}, "reward_model: '/nowhere' is not a local model directory"),
        ({"policy": "/nowhere"}, "policy: '/nowhere' is not a local model directory"),
        ({"mc_samples": 0}, "mc_samples: must be >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens: must be >= 1"),
        ({"temperature": 0.0}, "temperature: must be > 0"),
        ({"top_k": -1}, "top_k: must be >= 0"),
        ({"top_p": 0.0}, "top_p: must be in (0, 1]"),
        ({"baseline": "rloo"}, "baseline: 'rloo' is not allowed"),
        ({"method": "fast"}, "method: 'fast' is not allowed"),
        ({"method": "logra"}, "cannot apply Adam"),
        ({"candidates": 0}, "candidates: must be >= 1"),
        ({"targets": 0}, "targets: must be >= 1"),
        ({"proj_dim": 0}, "proj_dim: must be >= 1"),
    ],
)
def test_bad_params(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_dataclass(NiceParams, raw, "datasteer.params")
    assert message in str(err.value)


def test_local_policy_and_reward_model_are_loaded_and_checked(tmp_path: Path) -> None:
    from transformers import LlamaForSequenceClassification

    make_model(seed=1).save_pretrained(tmp_path / "policy")
    config = tiny_config(vocab_size=65, num_hidden_layers=1, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    model = make_model()
    target = ModelOps(model, one_token_rows([3, 4], [5, 6]), default_data_collator, 8, torch.device("cpu"), name="t")
    ops = ModelOps(
        model,
        one_token_rows([3, 4], list(range(10, 16))),
        default_data_collator,
        8,
        torch.device("cpu"),
        targets=[target],
    )
    params = {"policy": str(tmp_path / "policy"), "mc_samples": 2, "max_new_tokens": 2, "adam": False}
    selector = NiceSelector(NiceParams(**params))
    assert len(selector.select(select_context(ops=ops, num_samples=3, pool_size=6))) == 3
    assert selector._policy is not None and not selector._policy.training
    with pytest.raises(ConfigError, match=r"reward_model: .*vocabulary of 65 ids"):
        NiceSelector(NiceParams(**params, reward="model", reward_model=str(tmp_path / "rm"))).select(
            select_context(ops=ops, num_samples=3, pool_size=6)
        )


def test_feature_rows_that_are_not_finite_are_left_out_of_the_scoring() -> None:
    a = torch.randn(3, 5, generator=torch_generator(2, "a"))
    broken = torch.cat([a, torch.tensor([[float("inf")] * 5])])  # was kept as a target with signal: all NaN
    selector = NiceSelector(NiceParams())
    chosen = selector.select(select_context(ops=fake_ops(broken), num_samples=4))
    assert chosen.tolist() == torch.topk(mean_cosine(a), 4).indices.tolist()
    assert selector.report()["nonfinite"] == 1
