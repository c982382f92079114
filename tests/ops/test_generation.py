"""Tests of datasteer.ops.generation: determinism, untouched global RNG, left padding."""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from datasteer.ops.generation import generate
from tests.factories import VOCAB

PROMPTS = ["hello world", "ab", "the quick brown fox", "z"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ids 0-3 are <pad>, <s>, </s>, <unk> (Llama's bos 1, eos 2)."""
    chars = "abcdefghijklmnopqrstuvwxyz .,!?'"
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join characters without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def run(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, **kwargs: object) -> list[list[str]]:
    settings: dict = {"num_samples": 3, "max_new_tokens": 6, "temperature": 1.0, "seed": 0, "batch_size": 3}
    return generate(model, tokenizer, PROMPTS, **{**settings, **kwargs})


def test_shapes_determinism_and_seed(tiny_model: LlamaForCausalLM) -> None:
    tokenizer = char_tokenizer()
    first = run(tiny_model, tokenizer)
    assert len(first) == len(PROMPTS) and all(len(r) == 3 for r in first)
    assert all(len(text) <= 6 for r in first for text in r)
    assert first == run(tiny_model, tokenizer)
    assert first != run(tiny_model, tokenizer, seed=1)
    assert len({text for r in first for text in r}) > 1  # actually sampled


def test_global_rng_untouched_and_modes_restored(tiny_model: LlamaForCausalLM) -> None:
    tokenizer = char_tokenizer()
    tokenizer.padding_side = "right"
    tiny_model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    run(tiny_model, tokenizer)
    assert torch.equal(torch.get_rng_state(), before)
    assert tiny_model.training and tokenizer.padding_side == "right"
    # Same global state before and after: the caller's draws are unaffected.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(tiny_model, tokenizer)
    assert torch.equal(torch.rand(3), expected)


def test_greedy_matches_unbatched_generation(tiny_model: LlamaForCausalLM) -> None:
    tokenizer = char_tokenizer()
    out = run(tiny_model, tokenizer, temperature=0.0, num_samples=2)
    assert all(r[0] == r[1] for r in out)  # greedy: samples coincide
    for prompt, responses in zip(PROMPTS, out, strict=True):
        # Left padding must not change the continuation: compare with the prompt alone.
        ids = tokenizer(prompt, return_tensors="pt")
        alone = tiny_model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0)  # type: ignore[misc]
        assert responses[0] == tokenizer.decode(alone[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
