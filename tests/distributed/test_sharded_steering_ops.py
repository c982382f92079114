"""The model operations of ``dynamic_moe`` (expert loads) and ``nice`` (sampled responses,
policy-gradient features, selection) on a model sharded by DeepSpeed ZeRO-3 or FSDP2, with 2 CPU
processes, equal those of the plain model in one process; every rank gets the same result.

Both runs split their work unevenly (one rank has fewer rows and runs dummy batches), and NICE's
responses end after different numbers of steps on the two ranks: under ZeRO-3, generation
without ``synced_gpus`` put the ranks' parameter gathers out of step (gloo: "Received data size
doesn't match expected size. Is there a distributed collective mismatch").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.distributed.launch import NEEDS_DEEPSPEED, WORKERS, launch

WORKER = WORKERS / "steering_ops_worker.py"
ENGINES = [pytest.param("zero3", marks=NEEDS_DEEPSPEED), "fsdp2"]

Results = Callable[[str], dict[str, Any]]


def run(out: Path, engine: str, task: str) -> list[dict[str, Any]]:
    """Each rank's results of ``task`` on ``engine`` (one rank for ``plain``)."""
    nproc = 1 if engine == "plain" else 2
    launch(WORKER, out, engine, task, nproc=nproc, timeout=600, DS_ACCELERATOR="cpu")
    return [torch.load(f"{out}.rank{r}") for r in range(nproc)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Results:
    """The 1-process results of a task, computed once for the module."""
    cache: dict[str, dict[str, Any]] = {}

    def results(task: str) -> dict[str, Any]:
        if task not in cache:
            (cache[task],) = run(tmp_path_factory.mktemp("plain") / task, "plain", task)
        return cache[task]

    return results


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_expert_loads_equal_one_process(tmp_path: Path, plain: Results, engine: str) -> None:
    """Per-sample expert loads (routers frozen and partitioned like every other parameter), the
    mixer's per-domain loads and its proportions are exactly the 1-process ones on both ranks."""
    single = plain("moe")
    # The counts are integers: equal top-k choices give equal counts. The sharded passes change
    # the router logits by float rounding only (~1e-7 here: other batches, other summation
    # order), far below the smallest gap between a chosen and an unchosen expert's logit.
    assert single["margin"] > 1e-6
    assert single["counts"].shape == (17, 2, 4)  # 2 MoE layers (layer 1 is dense), 4 experts
    ranks = run(tmp_path / engine, engine, "moe")
    for key in ("counts", "domain_loads", "held_out", "proportions"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(ranks[0][key], single[key]), key


def steps(responses: list[list[int]], cap: int) -> int:
    """Forward passes ``generate`` made for one batch: its longest response (cut after EOS)."""
    return min(cap, max(map(len, responses)))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_nice_generation_and_features_equal_one_process(tmp_path: Path, plain: Results, engine: str) -> None:
    """NICE's sampled responses are the 1-process ones token for token, although the ranks'
    responses end after different numbers of steps; its features (``logra`` sampling and
    differentiating through the engine's hooks, ``vmap`` on gathered parameters) and the
    selection follow."""
    single = plain("nice")
    ranks = run(tmp_path / engine, engine, "nice")
    cap = 8  # max_new_tokens
    # generate straight through the engine: rank 0 samples 3 prompts, rank 1 2, and theirs end
    # after different numbers of forward passes.
    assert ranks[0]["generated"] == ranks[1]["generated"] == single["generated"]
    shares = single["generated"]
    assert len(shares[0]) == 3 and len(shares[1]) == 2
    assert steps([y for prompt in shares[0] for y in prompt], cap) != steps([y for p in shares[1] for y in p], cap)
    for method in ("logra", "vmap"):
        got, want = ranks[0][method], single[method]
        assert torch.equal(got["features"], ranks[1][method]["features"]), method
        torch.testing.assert_close(got["features"], want["features"], rtol=1e-5, atol=1e-5, msg=method)
        assert torch.equal(got["no_signal"], want["no_signal"]), method
        assert not want["no_signal"].all()  # some targets' rewards vary, so their rows are reward-weighted
        # The responses each rank sampled (rank 1 repeats target 0 as its dummy group) are the
        # 1-process ones, and the ranks stepped generate a different number of times in all.
        per_rank = got["sampled"]
        assert per_rank == ranks[1][method]["sampled"]
        assert [*per_rank[0], *per_rank[1][:2]] == want["sampled"][0]
        assert per_rank[1][2] == want["sampled"][0][0]
        totals = [sum(steps(responses, cap) for _, responses in calls) for calls in per_rank]
        assert totals[0] != totals[1], totals
    assert torch.equal(ranks[0]["selected"], ranks[1]["selected"])
    assert torch.equal(ranks[0]["selected"], single["selected"])
