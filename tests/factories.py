"""Tiny models and datasets built in process for the tests (no hub)."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from datasteer.mixers.base import MixContext
from datasteer.rng import torch_generator
from datasteer.selectors.base import SelectContext

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


def select_context(
    *,
    num_samples: int,
    pool_size: int | None = None,
    ops: object = None,
    update: int = 0,
    total_updates: int = 1,
    seed: int = 0,
    domains: torch.Tensor | list[int] | None = None,
    names: tuple[str, ...] = ("x",),
) -> SelectContext:
    """A selection context for unit tests, generator seeded by (seed, update); one domain
    unless ``domains`` (a domain id per pool sample, naming ``names``) are given."""
    if domains is None:
        assert pool_size is not None, "give pool_size or domains"
        domains = torch.zeros(pool_size, dtype=torch.long)
    domains = torch.as_tensor(domains, dtype=torch.long)
    return SelectContext(
        step=0,
        first_step=1,
        last_step=1,
        max_steps=10,
        update=update,
        domain_names=names,
        generator=torch_generator(seed, "select", update),
        total_updates=total_updates,
        num_samples=num_samples,
        pool_size=len(domains),
        domains=domains,
        ops=ops,  # type: ignore[arg-type]
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
    ops: object = None,
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
        ops=ops,  # type: ignore[arg-type]
    )


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
