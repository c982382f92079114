"""Rewards of sampled responses, on token ids (no tokenizer needed), for NICE.

* :func:`split_prompt_response`: a tokenised SFT row (``labels`` = ``IGNORE_INDEX`` on
  the prompt) -> its prompt ids (the prefix before the first labelled token) and its
  reference answer (the labelled ids);
* rewards, each called with one prompt, its sampled responses and the reference:
  :class:`ExactMatch` (the answer ids up to the first EOS are the reference's),
  :class:`TokenF1` (F1 of the id multisets, EOS excluded) and :class:`RewardModel` (a local
  ``AutoModelForSequenceClassification`` with one output, scored on prompt + response
  ids; it must share the policy's vocabulary).

The reward-weighted policy gradients built from them are in
:mod:`datasteer.ops.policy_gradient`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from datasteer.ops.hub import local_files_only
from datasteer.ops.losses import IGNORE_INDEX

Target = tuple[list[int], list[int]]  # (prompt ids, reference answer ids)


def _ids(value: Any) -> list[int]:
    return [int(x) for x in torch.as_tensor(value).reshape(-1).tolist()]


def split_prompt_response(row: Mapping[str, Any]) -> Target:
    """``(prompt ids, reference ids)`` of a tokenised row with ``input_ids`` and ``labels``.

    Positions whose ``attention_mask`` is 0 (padding) are dropped first.

    Raises:
        ValueError: the row has no labelled token (no response) or its first token is
            labelled (no prompt, e.g. a pre-training row).
    """
    ids, labels = _ids(row["input_ids"]), _ids(row["labels"])
    if "attention_mask" in row:
        keep = _ids(row["attention_mask"])
        ids = [t for t, k in zip(ids, keep, strict=True) if k]
        labels = [t for t, k in zip(labels, keep, strict=True) if k]
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first is None:
        raise ValueError("the row has no labelled token, so no response")
    if first == 0:
        raise ValueError("every token is labelled, so the row has no prompt (a pre-training row?)")
    return ids[:first], [label for label in labels[first:] if label != IGNORE_INDEX]


def eos_ids(model: nn.Module) -> frozenset[int]:
    """The model's end-of-sequence ids (generation config first, then the model config)."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return frozenset([eos] if isinstance(eos, int) else eos)
    raise ValueError("the model defines no eos_token_id; responses could never end")


def until_eos(ids: Sequence[int], eos: frozenset[int]) -> list[int]:
    """``ids`` up to (without) the first EOS id."""
    out = []
    for t in ids:
        if t in eos:
            break
        out.append(t)
    return out


class RewardFn(Protocol):
    """Scores the responses to one prompt: ``(M,)`` float32 rewards."""

    def __call__(self, prompt: list[int], responses: list[list[int]], reference: list[int]) -> torch.Tensor: ...


@dataclass(frozen=True)
class ExactMatch:
    """Reward 1 when the response's ids up to the first EOS equal the reference's, else 0."""

    eos: frozenset[int]

    def __call__(self, prompt: list[int], responses: list[list[int]], reference: list[int]) -> torch.Tensor:
        ref = until_eos(reference, self.eos)
        return torch.tensor([float(until_eos(r, self.eos) == ref) for r in responses])


def token_f1(response: Sequence[int], reference: Sequence[int]) -> float:
    """F1 of the two id multisets (1 when both are empty)."""
    if not response and not reference:
        return 1.0
    same = sum((Counter(response) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(response), same / len(reference)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class TokenF1:
    """Reward: :func:`token_f1` of the response and the reference, both up to their first EOS."""

    eos: frozenset[int]

    def __call__(self, prompt: list[int], responses: list[list[int]], reference: list[int]) -> torch.Tensor:
        ref = until_eos(reference, self.eos)
        return torch.tensor([token_f1(until_eos(r, self.eos), ref) for r in responses])


class RewardModel:
    """A sequence-classification reward model with one output, scored on prompt + response ids."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device, vocab_size: int) -> RewardModel:
        """Load a local ``AutoModelForSequenceClassification`` directory.

        Raises:
            ValueError: it has more than one output, or a vocabulary of another size than
                the policy's (``vocab_size``): it must read the policy's token ids.
        """
        from transformers import AutoModelForSequenceClassification

        model: Any = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=local_files_only())
        model = model.to(device)
        if model.config.num_labels != 1:
            raise ValueError(f"reward model {path} has {model.config.num_labels} outputs; it needs exactly 1")
        size = model.get_input_embeddings().num_embeddings
        if size != vocab_size:
            raise ValueError(
                f"reward model {path} has a vocabulary of {size} ids, the policy {vocab_size}: "
                "it must use the policy's tokenizer"
            )
        return cls(model)

    @torch.no_grad()
    def __call__(self, prompt: list[int], responses: list[list[int]], reference: list[int]) -> torch.Tensor:
        rows = [prompt + r for r in responses]
        # The model reads the score at the last token that is not its pad id: pad with an id
        # that occurs in no row, so that is each row's own last token.
        used = {t for row in rows for t in row}
        pad = next(t for t in range(len(used) + 1) if t not in used)
        width = max(len(row) for row in rows)
        device = next(self.model.parameters()).device
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
        config: Any = self.model.config
        old, config.pad_token_id = config.pad_token_id, pad
        try:
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        finally:
            config.pad_token_id = old
        return logits[:, 0].float().cpu()
