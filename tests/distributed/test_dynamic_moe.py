"""2-process CPU (gloo) runs of the dynamic_moe mixer: both ranks compute the same expert
loads (each routes its share of the held-out samples; the counts are gathered), hence the
same proportions, equal to one process."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.distributed.launch import WORKERS, launch, read_ranks

WORKER = WORKERS / "moe_worker.py"


@pytest.mark.slow
@pytest.mark.parametrize("source", ["pool", "eval"])
def test_dynamic_moe_proportions_are_identical_on_both_ranks(tmp_path: Path, source: str) -> None:
    launch(WORKER, tmp_path / "two", source, nproc=2)
    launch(WORKER, tmp_path / "one", source, nproc=1)
    (r0, r1), (single,) = read_ranks(tmp_path / "two", 2), read_ranks(tmp_path / "one", 1)
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
