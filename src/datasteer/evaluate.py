"""Per-domain held-out evaluation: token-mean loss and perplexity of each domain.

``datasteer eval MODEL`` scores a trained model (any local causal LM with its tokenizer)
on held-out text per domain, by default the built-in corpus's ``<domain>_eval`` splits:
the table the mixing papers report. Usable on the output of any run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from datasteer.ops.losses import per_token_loss


@dataclass(frozen=True)
class DomainResult:
    """Held-out result of one domain."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")


@torch.no_grad()
def domain_losses(
    model: Any,
    tokenizer: Any,
    texts: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 16,
    max_length: int = 128,
    device: str | torch.device = "cpu",
) -> dict[str, DomainResult]:
    """Token-mean next-token loss of each domain's texts (eval mode, no gradient).

    Each text is truncated to ``max_length`` tokens; the loss of a domain averages over all
    its predicted tokens (as the Trainer's ``eval_loss`` does).
    """
    was_training = model.training
    model.eval()
    results = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        for domain, rows in texts.items():
            total, count = 0.0, 0
            for start in tqdm(range(0, len(rows), batch_size), desc=f"eval {domain}", leave=False):
                enc = [
                    tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
                    for t in rows[start : start + batch_size]
                ]
                width = max(len(ids) for ids in enc)
                ids = torch.full((len(enc), width), pad, dtype=torch.long)
                mask = torch.zeros((len(enc), width), dtype=torch.long)
                for i, row in enumerate(enc):
                    ids[i, : len(row)] = torch.tensor(row)
                    mask[i, : len(row)] = 1
                labels = ids.masked_fill(mask == 0, -100)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                losses, keep = per_token_loss(logits, labels.to(device))
                total += float(losses.sum())
                count += int(keep.sum())
            results[domain] = DomainResult(loss=total / max(count, 1), tokens=count)
    finally:
        model.train(was_training)
    return results


def read_corpus_texts(
    corpus_dir: Path, domains: Sequence[str] | None = None, split: str = "eval"
) -> dict[str, list[str]]:
    """``text`` of each ``<domain>_<split>.jsonl`` in a built-in-format corpus directory."""
    files = sorted(corpus_dir.glob(f"*_{split}.jsonl"))
    available = {f.name[: -len(f"_{split}.jsonl")]: f for f in files}
    chosen = list(domains) if domains else list(available)
    missing = [d for d in chosen if d not in available]
    if missing:
        raise FileNotFoundError(f"no {split} file for domains {missing} in {corpus_dir} (have {sorted(available)})")
    return {d: [json.loads(line)["text"] for line in available[d].read_text().splitlines() if line] for d in chosen}


def format_results(results: Mapping[str, DomainResult]) -> str:
    """A table of loss, perplexity and token count per domain, with the mean over domains."""
    lines = [f"{'domain':<14}{'loss':>10}{'ppl':>12}{'tokens':>10}"]
    for domain, r in results.items():
        lines.append(f"{domain:<14}{r.loss:>10.4f}{r.perplexity:>12.2f}{r.tokens:>10d}")
    mean = sum(r.loss for r in results.values()) / max(len(results), 1)
    lines.append(f"{'mean':<14}{mean:>10.4f}{math.exp(mean):>12.2f}")
    return "\n".join(lines)
