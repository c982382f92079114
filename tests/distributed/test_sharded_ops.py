"""Model operations on a model sharded by DeepSpeed ZeRO-3 or FSDP2 (``fully_shard``), with 2 CPU
processes, equal those of the plain model in one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.distributed.launch import NEEDS_DEEPSPEED, WORKERS, launch

WORKER = WORKERS / "zero3_worker.py"
FEATURES = ("logra", "vmap", "dense", "loop", "losses", "embeddings")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora"])
@pytest.mark.parametrize("engine", [pytest.param("zero3", marks=NEEDS_DEEPSPEED), "fsdp2"])
def test_sharded_operations_equal_one_process(tmp_path: Path, engine: str, variant: str) -> None:
    """Losses, embeddings and gradient features (logra through the engine's own hooks; vmap,
    dense and loop on gathered / unsharded parameters) match the unsharded model; nothing is
    trained or left behind (no gradient, no optimizer state, parameters unchanged); Adam
    features are refused."""
    extra = ["lora"] if variant == "lora" else []
    launch(WORKER, tmp_path / "plain", "plain", *extra, nproc=1, timeout=600, DS_ACCELERATOR="cpu")
    launch(WORKER, tmp_path / engine, engine, *extra, nproc=2, timeout=600, DS_ACCELERATOR="cpu")
    single = torch.load(tmp_path / "plain.rank0")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{engine}.rank{rank}")
        for key in FEATURES:
            assert got[key].shape[0] == 19, key
            torch.testing.assert_close(got[key], single[key], rtol=1e-5, atol=1e-5, msg=key)
        assert all(got["checks"].values()), got["checks"]
        assert "adam_rejected" in got  # Adam features need the partitioned moments: a clear error
        # The gathered passes give every partition back (FSDP2: DTensor shards again). ZeRO-3
        # with LoRA keeps the first LoRA layers' parameters gathered until its next backward.
        if engine == "fsdp2" or variant == "full":
            assert bool(got["partitioned"])
