"""Model operations on an FSDP2 (``fully_shard``) model with 2 CPU processes equal those of the plain model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.distributed.test_zero3 import FEATURES, run


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora"])
def test_fsdp2_operations_equal_one_process(tmp_path: Path, variant: str) -> None:
    """logra runs through FSDP's hooks; vmap, dense and loop on unsharded parameters, resharded after;
    parameters unchanged, no gradient, no optimizer state; Adam features are refused."""
    extra = ["lora"] if variant == "lora" else []
    run(tmp_path / "plain", "plain", *extra)
    run(tmp_path / "fsdp2", "fsdp2", *extra, nproc=2)
    single = torch.load(tmp_path / "plain.rank0")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"fsdp2.rank{rank}")
        for key in FEATURES:
            assert got[key].shape[0] == 19, key
            torch.testing.assert_close(got[key], single[key], rtol=1e-5, atol=1e-5, msg=key)
        assert all(got["checks"].values()), got["checks"]
        assert "adam_rejected" in got
        assert bool(got["partitioned"])  # DTensor shards again after the unsharded passes
