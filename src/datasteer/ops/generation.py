"""Batched, seeded sampling of responses from the live model (for NICE and friends).

transformers' ``generate`` draws from the global RNG and has no generator argument, so
each batch runs inside ``torch.random.fork_rng()`` seeded from ``(seed, batch start)``:
results are reproducible for a given ``(seed, prompts, batch_size)`` and the caller's
global RNG state is exactly as it was before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from datasteer import dist
from datasteer.rng import derive_seed

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    desc: str = "generate",
) -> list[list[str]]:
    """Sample ``num_samples`` responses to each prompt.

    Args:
        model: a transformers causal LM (its train mode is restored afterwards).
        tokenizer: its tokenizer; prompts are left-padded (the side is restored), with
            the EOS token as padding when the tokenizer has no pad token.
        prompts: the prompt texts (already formatted with any chat template).
        num_samples: responses per prompt.
        max_new_tokens: cap on each response's length.
        temperature: sampling temperature; ``0`` means greedy decoding (then all
            samples of a prompt are the same).
        top_k: keep the ``k`` most likely tokens (``0``: no cut). Explicit because
            transformers otherwise applies its own default of 50.
        top_p: nucleus sampling mass (``1.0``: no cut).
        seed: base seed; batch ``i`` uses ``derive_seed(seed, "generate", i)``.
        batch_size: prompts per ``generate`` call. Results depend on it (the RNG
            stream is shared within a batch), so keep it fixed for reproducibility.
        desc: progress bar label (rank 0 only).

    Returns:
        ``len(prompts)`` lists of ``num_samples`` decoded responses (prompt excluded,
        special tokens skipped). Pass one rank's prompts to generate its share.
    """
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("num_samples, max_new_tokens and batch_size must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    greedy = temperature == 0
    # Greedy decoding gives one answer; transformers refuses num_return_sequences > 1 for
    # it, so decode once and repeat.
    returned = 1 if greedy else num_samples
    sampling: dict[str, Any] = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    )
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"  # generation continues from the right end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    results: list[list[str]] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=dist.rank() != 0, leave=False):
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
            # Fork only the RNG of the device in use (forking all CUDA devices warns and is slow).
            devices = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(derive_seed(seed, "generate", start))
                out = model.generate(  # type: ignore[operator]
                    **enc,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=returned,
                    pad_token_id=tokenizer.pad_token_id,
                    **sampling,
                )
            # Left padding: every prompt ends at the same column, responses follow it.
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            # generate repeats each prompt `returned` times in a row.
            for i in range(0, len(texts), returned):
                group = texts[i : i + returned]
                results.append(group * num_samples if greedy else group)
    finally:
        model.train(was_training)
        tokenizer.padding_side, tokenizer.pad_token = old_side, old_pad
    return results
