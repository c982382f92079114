"""2-process CPU (gloo) DDP runs: every rank serves the same stream, equal to 1 process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from datasteer.runlog import read_records

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(out: Path, paradigm: str, nproc: int, **extra_env: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra_env}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
    ]
    if nproc == 1:
        cmd = [sys.executable]
    proc = subprocess.run([*cmd, str(WORKER), str(out), paradigm], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def per_step(record: dict) -> dict[int, list[int]]:
    steps: dict[int, list[int]] = defaultdict(list)
    for step, indices in record["trained"]:
        steps[step].extend(indices)
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", ["mix", "select"])
def test_two_ranks_agree_and_match_one_process(tmp_path: Path, paradigm: str) -> None:
    launch(tmp_path / "one", paradigm, 1)
    launch(tmp_path / "two", paradigm, 2)
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    r0 = json.loads((tmp_path / "two" / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "two" / "rank1.json").read_text())
    # Identical plans (proportions / selections) on both ranks, equal to the 1-process run.
    assert r0["plans"] == r1["plans"] == single["plans"]
    # The ranks train disjoint shares of each step whose union is the 1-process step.
    one, a, b = per_step(single), per_step(r0), per_step(r1)
    assert sorted(one) == sorted(a) == sorted(b) == list(range(1, 8))
    for step in one:
        assert sorted(a[step] + b[step]) == sorted(one[step]), step
    # The event record (rank 0 writes it) matches too, timings aside.
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(read_records(tmp_path / "two" / "steering.jsonl")) == strip(
        read_records(tmp_path / "one" / "steering.jsonl")
    )


@pytest.mark.slow
def test_odm_proportions_are_identical_on_both_ranks(tmp_path: Path) -> None:
    """ODM learns from losses: each rank sees only its share, the all-reduced statistics agree."""
    launch(tmp_path / "two", "odm", 2)
    launch(tmp_path / "one", "odm", 1)
    r0 = json.loads((tmp_path / "two" / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "two" / "rank1.json").read_text())
    assert r0["plans"] == r1["plans"]
    records = read_records(tmp_path / "two" / "steering.jsonl")
    assert len(records) == 7 and len({tuple(r["proportions"].values()) for r in records}) > 1
    # Same statistics as one process up to float summation order, hence (nearly) the same proportions.
    single = read_records(tmp_path / "one" / "steering.jsonl")
    for a, b in zip(records, single, strict=True):
        assert list(a["proportions"].values()) == pytest.approx(list(b["proportions"].values()), abs=1e-4)


@pytest.mark.slow
def test_doremi_weights_are_identical_on_both_ranks(tmp_path: Path) -> None:
    """DoReMi's excess losses are all-reduced before each weight update: both ranks hold the
    same domain weights, equal (up to float summation order) to one process's."""
    from tests.factories import make_model

    make_model(seed=1).save_pretrained(tmp_path / "ref")
    launch(tmp_path / "two", "doremi", 2, DATASTEER_TEST_REFERENCE=str(tmp_path / "ref"))
    launch(tmp_path / "one", "doremi", 1, DATASTEER_TEST_REFERENCE=str(tmp_path / "ref"))
    r0, r1, single = (
        json.loads((tmp_path / d / f"rank{r}.json").read_text()) for d, r in (("two", 0), ("two", 1), ("one", 0))
    )
    assert r0["learned"] == r1["learned"] and r0["learned"] != pytest.approx([1 / 3] * 3)
    assert r0["learned"] == pytest.approx(single["learned"], abs=1e-6)
    two = read_records(tmp_path / "two" / "steering.jsonl")
    one = read_records(tmp_path / "one" / "steering.jsonl")
    for a, b in zip(two, one, strict=True):
        assert list(a["alpha"].values()) == pytest.approx(list(b["alpha"].values()), abs=1e-6)


@pytest.mark.slow
def test_sharded_model_operations_equal_one_process(tmp_path: Path) -> None:
    """Each rank computes its share; the gathered losses, embeddings and gradient features
    are the same on both ranks and equal the 1-process result."""
    worker = Path(__file__).with_name("ops_worker.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, str(worker), str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=300
    )
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    two = subprocess.run(
        [*cmd, str(worker), str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300
    )
    assert two.returncode == 0, two.stderr[-3000:]
    single = torch.load(tmp_path / "one.rank0")
    ranks = [torch.load(tmp_path / f"two.rank{r}") for r in (0, 1)]
    for key, value in single.items():
        assert value.shape[0] == 19, key
        for got in ranks:
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", ["near", "less", "cluster_less", "nice"])
def test_model_based_selections_agree_across_ranks(tmp_path: Path, paradigm: str) -> None:
    """Both ranks serve one selection (rank 0's, broadcast). The first is computed from the
    initial weights, so it equals the 1-process selection exactly; later ones come from
    weights that DDP's gradient averaging changed in the last float bits, so near-ties may
    order differently and they are compared by overlap."""
    launch(tmp_path / "one", paradigm, 1)
    launch(tmp_path / "two", paradigm, 2)
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())["plans"]
    r0 = json.loads((tmp_path / "two" / "rank0.json").read_text())["plans"]
    r1 = json.loads((tmp_path / "two" / "rank1.json").read_text())["plans"]
    assert r0 == r1
    assert [s for s, _ in r0] == [s for s, _ in single] == [1, 2, 5]  # warm-up, then updates 0 and 1
    r0, single = r0[1:], single[1:]
    (_, first_two), (_, first_one) = r0[0], single[0]
    assert first_two == first_one
    for (_, two), (_, one) in zip(r0[1:], single[1:], strict=True):
        assert len(set(two) & set(one)) >= 0.75 * len(one)
