"""Shared fixtures: a tiny Llama and small multi-domain datasets, built in process."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest
from datasets import Dataset
from transformers import LlamaForCausalLM

from tests.factories import make_dataset, make_model


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return make_model()


@pytest.fixture
def domain_dataset() -> Dataset:
    return make_dataset()
