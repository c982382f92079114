"""Tests of datasteer.assets: the built-in corpus, the tiny Llama model and the lazy, locked asset builds."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasteer.assets as assets
from datasteer.assets import (
    BUILTIN_ASSETS,
    BUILTIN_DOMAINS,
    assets_home,
    build_all,
    build_corpus,
    build_tiny_llama,
    build_tokenizer,
    ensure_builtin,
    resolve_builtin,
)
from datasteer.assets.corpus import code_chunks, prose_chunks

TRAIN = 50
EVAL = 10
SMALL_MODEL = {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2}


def _read_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus"), seed=0, train_per_domain=TRAIN, eval_per_domain=EVAL)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("model"), small_corpus, seed=0, **SMALL_MODEL)


@pytest.fixture
def small_builders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    """Point assets_home at tmp and make ensure_builtin build small assets; counts the builds."""
    monkeypatch.setenv("DATASTEER_HOME", str(tmp_path / "home"))
    calls = {"corpus": 0, "tiny-llama": 0}

    def corpus(out_dir: Path) -> Path:
        calls["corpus"] += 1
        return build_corpus(out_dir, train_per_domain=TRAIN, eval_per_domain=EVAL)

    def model(out_dir: Path, corpus_dir: Path) -> Path:
        calls["tiny-llama"] += 1
        return build_tiny_llama(out_dir, corpus_dir, **SMALL_MODEL)

    monkeypatch.setattr(assets, "build_corpus", corpus)
    monkeypatch.setattr(assets, "build_tiny_llama", model)
    return calls


# ------------------------------------------------------------------------------------------ corpus


def test_corpus_is_deterministic_and_seed_dependent(small_corpus: Path, tmp_path: Path) -> None:
    again = build_corpus(tmp_path / "again", seed=0, train_per_domain=TRAIN, eval_per_domain=EVAL)
    assert _files(again) == _files(small_corpus)
    other = _files(build_corpus(tmp_path / "other", seed=1, train_per_domain=TRAIN, eval_per_domain=EVAL))
    base = _files(small_corpus)
    for domain in BUILTIN_DOMAINS:
        assert other[f"{domain}.jsonl"] != base[f"{domain}.jsonl"]
        assert other[f"{domain}_eval.jsonl"] != base[f"{domain}_eval.jsonl"]


def test_corpus_rows_counts_and_disjoint_splits(small_corpus: Path) -> None:
    for domain in BUILTIN_DOMAINS:
        train = _read_rows(small_corpus / f"{domain}.jsonl")
        held_out = _read_rows(small_corpus / f"{domain}_eval.jsonl")
        assert (len(train), len(held_out)) == (TRAIN, EVAL)
        for row in train + held_out:
            assert list(row) == ["text", "prompt", "response", "domain"]
            assert row["domain"] == domain
            assert row["text"].strip() and row["prompt"].strip() and row["response"].strip()
        train_texts = {row["text"] for row in train}
        eval_texts = {row["text"] for row in held_out}
        assert len(train_texts) == TRAIN and len(eval_texts) == EVAL
        assert not train_texts & eval_texts


def test_prompt_response_split(small_corpus: Path) -> None:
    for domain in ("prose", "code", "noise"):
        for row in _read_rows(small_corpus / f"{domain}.jsonl"):
            assert row["text"].startswith(row["prompt"])
            assert row["text"].endswith(row["response"])
    for row in _read_rows(small_corpus / "arithmetic.jsonl"):
        assert row["prompt"].startswith("Compute ") and row["prompt"].endswith(".")
        for line in row["response"].splitlines():
            lhs, result = line.split(" = ")
            a, op, b = lhs.split(" ")
            assert op in "+-*"
            assert int(result) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_domains_differ_in_character(small_corpus: Path) -> None:
    code = " ".join(row["text"] for row in _read_rows(small_corpus / "code.jsonl"))
    prose = " ".join(row["text"] for row in _read_rows(small_corpus / "prose.jsonl"))
    noise = _read_rows(small_corpus / "noise.jsonl")
    assert "def " in code or "class " in code
    assert " the " in prose
    assert all(set(row["text"]) <= set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-() ") for row in noise)


def test_dataset_info_sources_and_manifest(small_corpus: Path) -> None:
    info = json.loads((small_corpus / "dataset_info.json").read_text())
    for domain in BUILTIN_DOMAINS:
        for suffix, file_name in (("", f"{domain}.jsonl"), ("_eval", f"{domain}_eval.jsonl")):
            assert info[f"{domain}{suffix}"] == {"file_name": file_name, "columns": {"prompt": "text"}}
            assert info[f"{domain}_sft{suffix}"] == {
                "file_name": file_name,
                "columns": {"prompt": "prompt", "response": "response"},
            }
    assert len(info) == 4 * len(BUILTIN_DOMAINS)
    sources = (small_corpus / "SOURCES.md").read_text()
    assert "pydoc_data" in sources and "PSF" in sources
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    assert manifest["settings"] == {"seed": 0, "train_per_domain": TRAIN, "eval_per_domain": EVAL}
    assert manifest["domains"] == list(BUILTIN_DOMAINS)
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((small_corpus / name).read_bytes()).hexdigest() == entry["sha256"]
    assert manifest["files"]["code_eval.jsonl"]["rows"] == EVAL


def test_too_large_request_raises_and_writes_nothing(tmp_path: Path) -> None:
    available = len(prose_chunks())
    with pytest.raises(ValueError, match=rf"'prose'.*only {available}"):
        build_corpus(tmp_path / "big", train_per_domain=available, eval_per_domain=1)
    assert not (tmp_path / "big").exists()
    with pytest.raises(ValueError, match="must be >= 1"):
        build_corpus(tmp_path / "zero", eval_per_domain=0)


def test_sources_cover_default_sizes() -> None:
    assert len(prose_chunks()) >= 1500 + 100
    assert len(code_chunks()) >= 1500 + 100
    assert all(100 <= len(chunk) <= 600 for chunk in prose_chunks())
    assert all(200 <= len(chunk) <= 600 for chunk in code_chunks())


# -------------------------------------------------------------------------------------- tiny model


def test_tokenizer_training_is_deterministic(small_corpus: Path, small_model: Path, tmp_path: Path) -> None:
    build_tokenizer(small_corpus, tmp_path / "tok", vocab_size=SMALL_MODEL["vocab_size"])
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (small_model / "tokenizer.json").read_bytes()


def test_model_and_tokenizer_load_and_run(small_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(small_model))
    model = AutoModelForCausalLM.from_pretrained(str(small_model))
    assert len(tokenizer) == SMALL_MODEL["vocab_size"]
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
    )
    assert tokenizer.model_max_length == 512
    config = model.config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert config.max_position_embeddings == 512 and not config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert config.vocab_size == len(tokenizer)

    text = "def add(a, b):\n    return a + b\n417 + 385 = 802"
    batch = tokenizer([text], return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tokenizer.bos_token_id
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == text
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert math.isfinite(loss.item())
    manifest = json.loads((small_model / "manifest.json").read_text())
    assert manifest["num_parameters"] == sum(p.numel() for p in model.parameters())


def test_model_build_is_deterministic_and_leaves_global_rng_alone(
    small_corpus: Path, small_model: Path, tmp_path: Path
) -> None:
    import torch

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    build_tiny_llama(tmp_path / "same", small_corpus, seed=0, **SMALL_MODEL)
    assert torch.equal(torch.get_rng_state(), before)
    assert _files(tmp_path / "same") == _files(small_model)
    build_tiny_llama(tmp_path / "other", small_corpus, seed=1, **SMALL_MODEL)
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != (small_model / "model.safetensors").read_bytes()


def test_bad_model_sizes_raise(small_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny_llama(tmp_path / "bad", small_corpus, hidden_size=30, num_heads=4)


# ------------------------------------------------------------------------------------ home, builds


def test_assets_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATASTEER_HOME", str(tmp_path / "x"))
    assert assets_home() == tmp_path / "x"
    monkeypatch.delenv("DATASTEER_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets_home() == tmp_path / ".cache" / "datasteer"


def test_resolve_builtin(small_builders: dict[str, int], tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert resolve_builtin("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert resolve_builtin("/data/my corpus") == "/data/my corpus"
    with pytest.raises(ValueError, match=r"nope.*corpus, tiny-llama"):
        resolve_builtin("builtin:nope")
    with pytest.raises(ValueError, match="unknown built-in asset"):
        ensure_builtin("nope")

    assert resolve_builtin("builtin:tiny-llama") == str(home / "tiny-llama")
    assert small_builders == {"corpus": 1, "tiny-llama": 1}  # the corpus came first
    assert resolve_builtin("builtin:corpus") == str(home / "corpus")
    assert (home / "corpus" / "manifest.json").is_file()
    assert (home / "tiny-llama" / "model.safetensors").is_file()
    assert build_all() == {"corpus": home / "corpus", "tiny-llama": home / "tiny-llama"}
    assert small_builders == {"corpus": 1, "tiny-llama": 1}  # nothing rebuilt
    assert sorted(p.name for p in home.iterdir()) == [".lock", *sorted(BUILTIN_ASSETS)]


def test_interrupted_build_leaves_nothing_and_force_rebuilds(
    small_builders: dict[str, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".corpus.tmp-leftover").mkdir()  # as left by a killed build

    def broken(out_dir: Path) -> Path:
        (out_dir / "prose.jsonl").write_text("half")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(assets, "build_corpus", broken)
        with pytest.raises(KeyboardInterrupt):
            ensure_builtin("corpus")
    assert sorted(p.name for p in home.iterdir()) == [".lock"]

    path = ensure_builtin("corpus")
    manifest = (path / "manifest.json").read_bytes()
    (path / "stale.txt").write_text("x")
    assert ensure_builtin("corpus", force=True) == path
    assert small_builders["corpus"] == 2
    assert not (path / "stale.txt").exists()
    assert (path / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in home.iterdir()) == [".lock", "corpus"]


def test_concurrent_ensure_builtin(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "DATASTEER_HOME": str(home)}
    code = "from datasteer.assets import ensure_builtin; print(ensure_builtin('corpus'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs == [str(home / "corpus")] * 2
    assert sorted(p.name for p in home.iterdir()) == [".lock", "corpus"]
    manifest = json.loads((home / "corpus" / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((home / "corpus" / name).read_bytes()).hexdigest() == entry["sha256"]
    assert manifest["files"]["prose.jsonl"]["rows"] == 1500


# ---------------------------------------------------------------------------------------- tiny MoE


def test_tiny_moe_builds_deterministically_and_loads_through_llamafactory(small_corpus: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from datasteer.assets import ON_DEMAND_ASSETS, build_tiny_moe
    from datasteer.ops.moe import expert_loads, find_routers

    settings = {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2}
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    path = build_tiny_moe(tmp_path / "moe", small_corpus, **settings)
    assert torch.equal(torch.get_rng_state(), before)
    assert _files(build_tiny_moe(tmp_path / "again", small_corpus, **settings)) == _files(path)
    # The same tokenizer as the tiny Llama.
    build_tokenizer(small_corpus, tmp_path / "tok", vocab_size=512)
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert model.config.model_type == "qwen2_moe"
    assert (model.config.num_experts, model.config.num_experts_per_tok) == (4, 2)
    assert list(find_routers(model)) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    loads = expert_loads(model, [{"input_ids": torch.tensor([[1, 5, 9, 200]])}])
    assert loads.shape == (1, 2, 4) and loads.sum(dim=-1).tolist() == [[8.0, 8.0]]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["asset"] == "tiny-moe" and manifest["settings"]["num_experts"] == 4
    assert manifest["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert "tiny-moe" in ON_DEMAND_ASSETS and "tiny-moe" not in BUILTIN_ASSETS  # not built by build_all
    with pytest.raises(ValueError, match="top_k"):
        build_tiny_moe(tmp_path / "bad", small_corpus, num_experts=2, top_k=3)

    pytest.importorskip("llamafactory")
    from llamafactory.hparams import FinetuningArguments, ModelArguments
    from llamafactory.model import load_model, load_tokenizer

    model_args = ModelArguments(model_name_or_path=str(path))
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    loaded = load_model(tokenizer, model_args, FinetuningArguments(finetuning_type="full"), is_trainable=True)
    assert type(loaded).__name__ == "Qwen2MoeForCausalLM"
    assert len(find_routers(loaded)) == 2


def test_resolve_builtin_tiny_moe(
    small_builders: dict[str, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from datasteer.assets import build_tiny_moe

    built: list[Path] = []

    def moe(out_dir: Path, corpus_dir: Path) -> Path:
        built.append(out_dir)
        return build_tiny_moe(out_dir, corpus_dir, vocab_size=512, hidden_size=32, num_layers=2, num_heads=2)

    monkeypatch.setattr(assets, "build_tiny_moe", moe)
    home = tmp_path / "home"
    assert resolve_builtin("builtin:tiny-moe") == str(home / "tiny-moe")
    assert resolve_builtin("builtin:tiny-moe") == str(home / "tiny-moe")  # built once
    assert len(built) == 1 and small_builders == {"corpus": 1, "tiny-llama": 0}  # the corpus came first
    assert (home / "tiny-moe" / "model.safetensors").is_file()
