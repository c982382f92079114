"""2-process CPU (gloo) runs of the dynamic_moe mixer: both ranks compute the same expert
loads (each routes its share of the held-out samples; the counts are gathered), hence the
same proportions, equal to one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("moe_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(out: Path, source: str, nproc: int) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port"]
    cmd = [*cmd, str(free_port())] if nproc > 1 else [sys.executable]
    proc = subprocess.run([*cmd, str(WORKER), str(out), source], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["pool", "eval"])
def test_dynamic_moe_proportions_are_identical_on_both_ranks(tmp_path: Path, source: str) -> None:
    r0, r1 = launch(tmp_path / "two", source, 2)
    (single,) = launch(tmp_path / "one", source, 1)
    assert r0 == r1  # plans, the mixer's history (Delta, weights) and its held-out rows
    assert r0["source"] == single["source"] == source
    assert r0["router"] is False  # frozen on every rank
    assert [s for s, _ in r0["plans"]] == [1, 2, 4, 6]  # initial, then updates 0, 1, 2
    assert r0["held_out"] == single["held_out"]
    # Update 0 routes with the initial weights on both runs: exactly the 1-process numbers.
    assert r0["history"][0] == single["history"][0]
    assert r0["plans"][1] == single["plans"][1]
    # Later ones follow weights that DDP's gradient averaging changed in the last bits.
    for two, one in zip(r0["history"][1:], single["history"][1:], strict=True):
        assert two["weights"] == pytest.approx(one["weights"], abs=1e-3)
