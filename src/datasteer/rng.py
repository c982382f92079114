"""Explicit, reproducible randomness.

Every random draw in datasteer comes from a generator seeded by ``(seed, *keys)``, e.g.
``torch_generator(seed, "select", step)``. The keys are hashed with SHA-256 (not Python's
salted ``hash``), so the same keys give the same stream in every process and on every rank,
and nothing ever reads or advances the global RNG.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that depends on ``seed`` and each key, stably across processes."""
    text = "\x1f".join([str(int(seed)), *(repr(k) for k in keys)])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def torch_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, *keys)``."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
