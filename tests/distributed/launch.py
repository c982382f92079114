"""Launching the multi-process CPU (gloo) workers of the distributed tests."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

#: The folder of the worker scripts.
WORKERS = Path(__file__).resolve().parent
#: Marks a test (or parameter) that runs a DeepSpeed engine: skipped without the deepspeed extra.
NEEDS_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed extra")


def free_port() -> int:
    """A TCP port free on this machine now (for the rendezvous of one launch)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(worker: Path, *args: str | Path, nproc: int, timeout: float = 300, **env: str) -> None:
    """Run ``worker args...`` as ``nproc`` ranks (``torch.distributed.run``), or as one plain
    process when ``nproc`` is 1; fail the test with the end of its stderr unless it exits 0.

    The processes run offline with one OpenMP thread each (the ranks share a small CPU),
    plus the variables ``env``.
    """
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    proc = subprocess.run(
        [*cmd, str(worker), *map(str, args)], capture_output=True, text=True, env=environ, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def read_ranks(out: Path, nproc: int) -> list[Any]:
    """The ``rank<r>.json`` record each rank wrote to ``out``, in rank order."""
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
