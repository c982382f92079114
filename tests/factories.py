"""Tiny models and datasets built in process for the tests (no hub)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from datasteer.mixers.base import MixContext
from datasteer.ops.protocol import NO_MODEL, ModelOperations
from datasteer.rng import torch_generator
from datasteer.runlog import read_records
from datasteer.selectors.base import SelectContext
from datasteer.streams import StreamedDomains
from datasteer.weighters.base import WeightContext

VOCAB = 64
SEQ = 12
DOMAINS = ("alpha", "beta", "gamma")


def tiny_config(**overrides: object) -> LlamaConfig:
    """The tiny Llama of the tests (vocabulary ``VOCAB``, width 16, 2 layers), with overrides."""
    settings: dict[str, object] = {
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    }
    return LlamaConfig(**{**settings, **overrides})


def make_model(seed: int = 0) -> LlamaForCausalLM:
    config = tiny_config(max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def make_dataset(sizes: tuple[int, ...] = (40, 24, 16), seed: int = 0) -> Dataset:
    """Fixed-length token rows; domain d draws tokens from its own vocabulary band."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "domain": []}
    band = VOCAB // len(sizes)
    for d, n in enumerate(sizes):
        for _ in range(n):
            ids = rng.integers(d * band, (d + 1) * band, size=SEQ).tolist()
            rows["input_ids"].append(ids)
            rows["attention_mask"].append([1] * SEQ)
            rows["labels"].append(ids)
            rows["domain"].append(DOMAINS[d])
    return Dataset.from_dict(rows)


def make_streams(
    folder: Path, sizes: tuple[int, ...] = (40, 24, 16), seed: int = 0, keep: int = 1024
) -> StreamedDomains:
    """:func:`make_dataset`'s rows written as one jsonl file per domain, read back as streams
    (row ``i`` of a domain's file is the ``i``-th row of that domain in ``make_dataset``)
    that keep ``keep`` rows each."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = make_dataset(sizes, seed).to_list()
    paths = {}
    for name in DOMAINS[: len(sizes)]:
        paths[name] = folder / f"{name}.jsonl"
        with paths[name].open("w") as f:
            for row in rows:
                if row["domain"] == name:
                    f.write(json.dumps({k: v for k, v in row.items() if k != "domain"}) + "\n")
    return StreamedDomains.from_paths(paths, keep=keep)


def select_context(
    *,
    num_samples: int,
    pool_size: int | None = None,
    ops: ModelOperations = NO_MODEL,
    update: int = 0,
    total_updates: int = 1,
    seed: int = 0,
    domains: torch.Tensor | np.ndarray | list[int] | None = None,
    names: tuple[str, ...] = ("x",),
    step: int = 0,
    first_step: int = 1,
    last_step: int = 1,
    max_steps: int = 10,
) -> SelectContext:
    """A selection context for unit tests, generator seeded by (seed, update).

    The pool is one domain of ``pool_size`` samples (default: the rows of ``ops.dataset``)
    unless ``domains`` (a domain id per pool sample, naming ``names``) are given.
    """
    if domains is None:
        if pool_size is None:
            assert ops is not NO_MODEL, "give pool_size, domains or ops"
            pool_size = len(ops.dataset)
        domains = torch.zeros(pool_size, dtype=torch.long)
    domains = torch.as_tensor(domains, dtype=torch.long)
    return SelectContext(
        step=step,
        first_step=first_step,
        last_step=last_step,
        max_steps=max_steps,
        update=update,
        domain_names=names,
        generator=torch_generator(seed, "select", update),
        total_updates=total_updates,
        num_samples=num_samples,
        pool_size=len(domains),
        domains=domains,
        ops=ops,
    )


def mix_context(
    *,
    k: int = 3,
    update: int = 0,
    seed: int = 0,
    step: int = 0,
    first_step: int = 1,
    last_step: int = 10,
    max_steps: int = 100,
    names: tuple[str, ...] | None = None,
    sizes: tuple[int, ...] | None = None,
    ops: ModelOperations = NO_MODEL,
    domains: torch.Tensor | None = None,
) -> MixContext:
    """A mixing context for unit tests: K domains (uniform proportions), generator seeded by (seed, update)."""
    names = names or tuple(f"d{i}" for i in range(k))
    sizes = sizes or (5,) * len(names)
    if domains is None:
        domains = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))
    return MixContext(
        step=step,
        first_step=first_step,
        last_step=last_step,
        max_steps=max_steps,
        update=update,
        domain_names=names,
        domain_sizes=sizes,
        proportions=torch.full((len(names),), 1.0 / len(names), dtype=torch.float64),
        domains=domains,
        generator=torch_generator(seed, "mix", update),
        ops=ops,
    )


def weight_context(
    losses: torch.Tensor,
    *,
    indices: torch.Tensor | None = None,
    domains: torch.Tensor | None = None,
    step: int = 1,
    max_steps: int = 10,
    seed: int = 0,
    names: tuple[str, ...] = (),
    embeddings: torch.Tensor | None = None,
    reference_losses: torch.Tensor | None = None,
) -> WeightContext:
    """A weighting context for unit tests: one micro-batch with these per-sample losses
    (pool indices 0..b-1 and domain 0 unless given; ``names`` names the domain ids),
    generator seeded by (seed, step)."""
    b = len(losses)
    return WeightContext(
        step=step,
        max_steps=max_steps,
        losses=losses,
        indices=indices if indices is not None else torch.arange(b),
        domains=domains if domains is not None else torch.zeros(b, dtype=torch.long),
        generator=torch_generator(seed, "weight", step),
        embeddings=embeddings,
        reference_losses=reference_losses,
        domain_names=names,
    )


def training_args(output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    """The tests' ``TrainingArguments``: CPU, no reporting or progress bars, seed 3 and a
    learning rate (1e-2) at which the tiny model moves in a few steps; ``overrides`` win."""
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "seed": 3,
        "learning_rate": 1e-2,
    }
    return TrainingArguments(**{**settings, **overrides})


def steering_records(path: str | Path) -> list[dict[str, Any]]:
    """A run's ``steering.jsonl`` records without its closing (``paradigm: end``) record."""
    return [r for r in read_records(path) if r.get("paradigm") != "end"]


def without_seconds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steering records without their wall-clock ``seconds``, for comparing two runs."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def make_moe_model(seed: int = 0, *, kind: str = "qwen2_moe", layers: int = 3) -> torch.nn.Module:
    """A tiny MoE causal LM (4 experts, top-2). ``qwen2_moe``: sparse layers with a shared
    expert (its MLP has a ``gate_proj``) and layer 1 dense (an MLP ``gate_proj``);
    ``mixtral``: every layer sparse."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = {
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "num_experts_per_tok": 2,
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "mixtral":
            return MixtralForCausalLM(MixtralConfig(num_local_experts=4, **common))
        config = Qwen2MoeConfig(
            num_experts=4,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            **common,
        )
        return Qwen2MoeForCausalLM(config)


def make_sft_dataset(sizes: tuple[int, ...] = (40, 24, 16), seed: int = 0, prompt_len: int = 4) -> Dataset:
    """:func:`make_dataset` rows as prompt/response pairs: the first ``prompt_len`` labels are -100."""
    return make_dataset(sizes, seed).map(lambda row: {"labels": [-100] * prompt_len + row["labels"][prompt_len:]})


def user_module_dir(tmp_path: Path, monkeypatch: Any, name: str, source: str) -> Path:
    """Make ``tmp_path`` the working directory, holding ``<name>.py`` (also importable as module
    ``name``) with ``source``, and ``broken.py``, which fails on import (for the ``custom``
    algorithms' loading tests)."""
    (tmp_path / f"{name}.py").write_text(source)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path
