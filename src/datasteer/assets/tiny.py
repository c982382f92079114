"""Tiny Llama and Mixture-of-Experts models with a byte-level BPE tokenizer, built locally from the corpus.

:func:`build_tokenizer` trains a byte-level BPE tokenizer (``tokenizers``) on the corpus training files and
saves it as a ``transformers`` fast tokenizer; :func:`build_tiny_llama` adds a randomly initialised
``LlamaForCausalLM`` of a few million parameters next to it, and :func:`build_tiny_moe` a randomly
initialised ``Qwen2MoeForCausalLM`` (4 experts, top-2) with the same tokenizer, so each directory loads with
``AutoTokenizer.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained``. Nothing is downloaded and
every build is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from datasteer.assets.corpus import BUILTIN_DOMAINS

logger = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
"""Special tokens, in id order (``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<pad>`` = 3)."""

MODEL_MAX_LENGTH = 512
"""Maximum sequence length of the tokenizer and the model's position embeddings."""

TINY_FORMAT_VERSION = 1
"""Bumped whenever the content or layout of a built model directory changes."""

TINY_MOE_FORMAT_VERSION = 1
"""The same, for the tiny MoE model."""


def _train_texts(corpus_dir: Path) -> Iterator[str]:
    """The ``text`` field of every training row, domain by domain in canonical order."""
    for domain in BUILTIN_DOMAINS:
        path = corpus_dir / f"{domain}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"corpus training file {path} not found; build the corpus first")
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)["text"]


def build_tokenizer(corpus_dir: Path, out_dir: Path, *, vocab_size: int = 4096) -> Path:
    """Train a byte-level BPE tokenizer on the corpus training files and save it.

    The texts are fed in a fixed order (domains in :data:`~datasteer.assets.corpus.BUILTIN_DOMAINS` order,
    rows in file order), so the same files give the same vocabulary and merges. The tokenizer adds ``<s>``
    in front of every sequence when called with ``add_special_tokens=True`` (as Llama's does).

    Args:
        corpus_dir: Directory made by :func:`~datasteer.assets.corpus.build_corpus`.
        out_dir: Directory to save into (``tokenizer.json``, ``tokenizer_config.json``, ...); created if
            missing.
        vocab_size: Target vocabulary size, special tokens and the 256 byte symbols included.

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: If a training file of the corpus is missing.
        ValueError: If ``vocab_size`` is too small to hold the byte alphabet and the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {len(alphabet) + len(SPECIAL_TOKENS)}, got {vocab_size}")
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_train_texts(corpus_dir), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    logger.info("trained byte-level BPE tokenizer (%d tokens) on %s into %s", len(fast), corpus_dir, out_dir)
    return out_dir


def _build(
    out_dir: Path,
    corpus_dir: Path,
    asset: str,
    format_version: int,
    settings: dict[str, Any],
    make_model: Callable[[dict[str, Any]], Any],
) -> Path:
    """Train the tokenizer, initialise ``make_model(common config keys)`` under
    ``torch.manual_seed(settings["seed"])`` inside ``fork_rng`` (the caller's RNG is left as it
    was), save it, then write ``manifest.json`` last."""
    import torch
    from transformers import AutoTokenizer

    out_dir, corpus_dir = Path(out_dir), Path(corpus_dir)
    build_tokenizer(corpus_dir, out_dir, vocab_size=settings["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    common = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        model = make_model(common)
    _save(out_dir, corpus_dir, model, asset, format_version, settings, len(tokenizer))
    return out_dir


def _save(
    out_dir: Path,
    corpus_dir: Path,
    model: Any,
    asset: str,
    format_version: int,
    settings: dict[str, Any],
    tokenizer_vocab_size: int,
) -> None:
    """Save the model's safetensors weights and config, then ``manifest.json`` (written last)."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    num_parameters = sum(p.numel() for p in model.parameters())
    files = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out_dir.iterdir())
        if path.is_file() and path.name != "manifest.json"
    }
    corpus_manifest = corpus_dir / "manifest.json"
    manifest = {
        "asset": asset,
        "format_version": format_version,
        "settings": settings,
        "tokenizer_vocab_size": tokenizer_vocab_size,
        "num_parameters": num_parameters,
        "corpus_manifest_sha256": (
            hashlib.sha256(corpus_manifest.read_bytes()).hexdigest() if corpus_manifest.is_file() else None
        ),
        "files": files,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "built %s in %s: %d parameters (%.2f M), vocab %d, settings %s",
        asset,
        out_dir,
        num_parameters,
        num_parameters / 1e6,
        tokenizer_vocab_size,
        settings,
    )


def _intermediate_size(hidden_size: int) -> int:
    """About 2.7x ``hidden_size``, rounded to a multiple of 16."""
    return max(16, round(2.7 * hidden_size / 16) * 16)


def build_tiny_llama(
    out_dir: Path,
    corpus_dir: Path,
    *,
    vocab_size: int = 4096,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Build a tiny randomly initialised Llama model and its tokenizer into one directory.

    Trains the tokenizer with :func:`build_tokenizer`, then initialises ``LlamaForCausalLM`` (untied
    embeddings, ``max_position_embeddings=512``, intermediate size about 2.7x the hidden size) with
    ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng()``, so the caller's global torch RNG state
    is left as it was. Saves safetensors weights, the config, the tokenizer and a ``manifest.json``
    (settings, parameter count, file hashes) written last.

    Args:
        out_dir: Directory to save into; created if missing.
        corpus_dir: Directory made by :func:`~datasteer.assets.corpus.build_corpus`.
        vocab_size: Target tokenizer vocabulary size; the model's embedding matches the trained tokenizer.
        hidden_size: Model width.
        num_layers: Number of decoder layers.
        num_heads: Number of attention (and key/value) heads; must divide ``hidden_size``.
        seed: Seed of the weight initialisation.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: If ``num_heads`` does not divide ``hidden_size``, or a size is not positive.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if min(hidden_size, num_layers, num_heads) < 1 or hidden_size % num_heads:
        raise ValueError(
            f"need positive sizes with num_heads dividing hidden_size; got hidden_size={hidden_size}, "
            f"num_layers={num_layers}, num_heads={num_heads}"
        )

    def make(common: dict[str, Any]) -> Any:
        config = LlamaConfig(
            **common,
            hidden_size=hidden_size,
            intermediate_size=_intermediate_size(hidden_size),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
        )
        return LlamaForCausalLM(config)

    settings = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "seed": seed,
    }
    return _build(out_dir, corpus_dir, "tiny-llama", TINY_FORMAT_VERSION, settings, make)


def build_tiny_moe(
    out_dir: Path,
    corpus_dir: Path,
    *,
    vocab_size: int = 4096,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_experts: int = 4,
    top_k: int = 2,
    seed: int = 0,
) -> Path:
    """Build a tiny randomly initialised Mixture-of-Experts model (Qwen2-MoE) and its tokenizer.

    The tokenizer is trained exactly as :func:`build_tiny_llama` trains it, so the two
    models share a vocabulary. Every decoder layer is sparse: a router (``mlp.gate``)
    sends each token to ``top_k`` of ``num_experts`` experts, next to a shared expert
    whose MLP has its own ``gate_proj`` and a scalar ``shared_expert_gate`` (a model on
    which a ``"gate"`` substring test would freeze far more than the routers). Expert
    width is twice the hidden size; no router auxiliary loss (``output_router_logits`` is
    off in the config). Weights are initialised inside ``torch.random.fork_rng()`` with
    ``torch.manual_seed(seed)``; the directory loads with ``AutoModelForCausalLM``.

    Args:
        out_dir: Directory to save into; created if missing.
        corpus_dir: Directory made by :func:`~datasteer.assets.corpus.build_corpus`.
        vocab_size: Target tokenizer vocabulary size.
        hidden_size: Model width.
        num_layers: Number of decoder (MoE) layers.
        num_heads: Number of attention (and key/value) heads; must divide ``hidden_size``.
        num_experts: Routed experts per layer.
        top_k: Experts each token is routed to (``num_experts_per_tok``).
        seed: Seed of the weight initialisation.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: If a size is not positive, ``num_heads`` does not divide ``hidden_size``
            or ``top_k`` exceeds ``num_experts``.
    """
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    if (
        min(hidden_size, num_layers, num_heads, num_experts, top_k) < 1
        or hidden_size % num_heads
        or top_k > num_experts
    ):
        raise ValueError(
            f"need positive sizes, num_heads dividing hidden_size and top_k <= num_experts; got hidden_size="
            f"{hidden_size}, num_layers={num_layers}, num_heads={num_heads}, num_experts={num_experts}, top_k={top_k}"
        )

    def make(common: dict[str, Any]) -> Any:
        config = Qwen2MoeConfig(
            **common,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=2 * hidden_size,
            shared_expert_intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=False,
            output_router_logits=False,
        )
        return Qwen2MoeForCausalLM(config)

    settings = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_experts": num_experts,
        "top_k": top_k,
        "seed": seed,
    }
    return _build(out_dir, corpus_dir, "tiny-moe", TINY_MOE_FORMAT_VERSION, settings, make)
