"""Per-domain held-out evaluation against a per-text computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from datasteer.evaluate import domain_losses, format_results, read_corpus_texts
from tests.factories import make_model
from tests.integrations.test_trl import char_tokenizer


def test_domain_losses_equal_the_token_mean_over_each_text_scored_alone() -> None:
    model, tok = make_model(), char_tokenizer()
    texts = {"sums": ["1 + 1 = 2.", "12 + 30 = 42.", "7 = 7."], "words": ["the fox", "a quick brown dog"]}
    results = domain_losses(model, tok, texts, batch_size=2, max_length=10)
    for domain, rows in texts.items():
        total, count = 0.0, 0
        for text in rows:
            ids = torch.tensor([tok(text, truncation=True, max_length=10)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            total += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
        assert results[domain].loss == pytest.approx(total / count, rel=1e-5)
        assert results[domain].tokens == count
        assert results[domain].perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert model.training  # restored
    table = format_results(results)
    assert table.splitlines()[0].split() == ["domain", "loss", "ppl", "tokens", "accuracy"]
    assert table.splitlines()[-1].startswith("mean")


def test_read_corpus_texts(tmp_path: Path) -> None:
    for d in ("a", "b"):
        (tmp_path / f"{d}_eval.jsonl").write_text(
            json.dumps({"text": f"{d} one"}) + "\n" + json.dumps({"text": f"{d} two"}) + "\n"
        )
    assert read_corpus_texts(tmp_path) == {"a": ["a one", "a two"], "b": ["b one", "b two"]}
    assert read_corpus_texts(tmp_path, ["b"]) == {"b": ["b one", "b two"]}
    with pytest.raises(FileNotFoundError, match=r"domains \['c'\]"):
        read_corpus_texts(tmp_path, ["c"])
