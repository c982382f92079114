"""Model operations under DeepSpeed ZeRO-3 with 2 CPU processes equal those of the plain model."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("zero3_worker.py")
FEATURES = ("logra", "vmap", "dense", "loop", "losses", "embeddings")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed extra"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(out: Path, *args: str, nproc: int = 1) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    proc = subprocess.run([*cmd, str(WORKER), str(out), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_zero3_operations_equal_one_process(tmp_path: Path, variant: str) -> None:
    """Losses, embeddings and gradient features (logra through DeepSpeed's hooks; vmap, dense
    and loop on gathered parameters) match the unsharded model; nothing is trained or left."""
    extra = ["lora"] if variant == "lora" else []
    run(tmp_path / "plain", "plain", *extra)
    run(tmp_path / "zero3", "zero3", *extra, nproc=2)
    single = torch.load(tmp_path / "plain.rank0")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"zero3.rank{rank}")
        for key in FEATURES:
            assert got[key].shape[0] == 19, key
            torch.testing.assert_close(got[key], single[key], rtol=1e-5, atol=1e-5, msg=key)
        assert all(got["checks"].values()), got["checks"]
        assert "adam_rejected" in got  # Adam features need the partitioned moments: a clear error
        if variant == "full":  # the gathered passes give every partition back
            assert bool(got["partitioned"])
