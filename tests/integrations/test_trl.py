"""TRL's SFTTrainer with the steering mixin: same overrides, TRL's own data processing."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset
from tests.factories import make_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from datasteer.hf import SteeringMixin
from datasteer.runlog import read_records

trl = pytest.importorskip("trl")


def char_tokenizer() -> PreTrainedTokenizerFast:
    chars = "abcdefghijklmnopqrstuvwxyz0123456789 +=."
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


class SteeringSFTTrainer(SteeringMixin, trl.SFTTrainer):
    pass


def test_sft_trainer_mixes_domains(tmp_path: Path) -> None:
    texts, domains = [], []
    for i in range(30):
        texts.append(f"{i} + {i} = {2 * i}.")
        domains.append("sums")
        texts.append(f"the quick brown fox number {i}")
        domains.append("words")
    dataset = Dataset.from_dict({"text": texts, "domain": domains})
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_length=32,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=6,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        save_strategy="no",
    )
    trainer = SteeringSFTTrainer(
        model=make_model(),
        args=config,
        train_dataset=dataset,
        processing_class=char_tokenizer(),
        steering={"paradigm": "mix", "algorithm": "static", "params": {"proportions": [0.75, 0.25]}},
    )
    trainer.train()
    record, closing = read_records(tmp_path / "steering.jsonl")
    assert record["proportions"] == {"sums": 0.75, "words": 0.25}
    # Every step of 4 rows trained 3 "sums" and 1 "words" (counted from the indices that
    # reached compute_loss through TRL's collator, and put on record at train end).
    assert closing["paradigm"] == "end" and closing["served"] == {"sums": 18, "words": 6}
