"""Rewards on token ids: rows split into prompt and reference, exact match, token F1, a reward model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForSequenceClassification

from datasteer.ops.rewards import ExactMatch, RewardModel, TokenF1, split_prompt_response, token_f1
from tests.factories import VOCAB, tiny_config

EOS = frozenset({2})


# ----------------------------------------------------------------------------- rows and rewards


def test_split_prompt_response() -> None:
    row = {"input_ids": [5, 6, 7, 8, 2, 0], "labels": [-100, -100, 7, 8, 2, -100], "attention_mask": [1] * 5 + [0]}
    assert split_prompt_response(row) == ([5, 6], [7, 8, 2])
    assert split_prompt_response({"input_ids": torch.tensor([4, 9]), "labels": torch.tensor([-100, 9])}) == ([4], [9])
    with pytest.raises(ValueError, match="no prompt"):
        split_prompt_response({"input_ids": [5, 6], "labels": [5, 6]})
    with pytest.raises(ValueError, match="no response"):
        split_prompt_response({"input_ids": [5, 6], "labels": [-100, -100]})


def test_exact_match_compares_answers_up_to_eos() -> None:
    reward = ExactMatch(EOS)
    responses = [[7, 8, 2, 9], [7, 8], [7, 8, 9, 2], [2], [8, 7, 2]]
    assert reward([5], responses, [7, 8, 2]).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_token_f1_by_hand() -> None:
    # common multiset {2, 2}: precision 2/4, recall 2/3, F1 = 2 PR / (P + R) = 4/7
    assert token_f1([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(4 / 7)
    assert token_f1([], []) == 1.0 and token_f1([1], []) == 0.0 and token_f1([1], [3]) == 0.0
    # EOS and what follows it do not count
    assert TokenF1(EOS)([5], [[9, 2, 4], [4, 9, 2]], [9, 4, 2]).tolist() == pytest.approx([2 / 3, 1.0])


# ----------------------------------------------------------------------------- a local reward model


def tiny_reward_model(num_labels: int = 1, vocab: int = VOCAB) -> LlamaForSequenceClassification:
    config = tiny_config(vocab_size=vocab, num_hidden_layers=1, num_labels=num_labels)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(config)


def test_reward_model_scores_each_sequence_as_if_alone(tmp_path: Path) -> None:
    tiny_reward_model().save_pretrained(tmp_path / "rm")
    reward = RewardModel.load(tmp_path / "rm", device=torch.device("cpu"), vocab_size=VOCAB)
    prompt, responses = [4, 5], [[6, 7, 2], [0], [8, 1, 1, 9, 2]]  # id 0 occurs, so padding uses 3
    got = reward(prompt, responses, [])
    alone = [float(reward.model(input_ids=torch.tensor([prompt + r])).logits[0, 0]) for r in responses]
    assert got.tolist() == pytest.approx(alone, abs=1e-5)
    assert reward.model.config.pad_token_id is None  # restored


def test_reward_model_needs_one_output_and_the_policy_vocabulary(tmp_path: Path) -> None:
    tiny_reward_model(vocab=VOCAB + 1).save_pretrained(tmp_path / "wide")
    tiny_reward_model(num_labels=2).save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="vocabulary of 65 ids"):
        RewardModel.load(tmp_path / "wide", device=torch.device("cpu"), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="exactly 1"):
        RewardModel.load(tmp_path / "two", device=torch.device("cpu"), vocab_size=VOCAB)
