"""2-process CPU (gloo) DDP runs: every rank serves the same stream, equal to 1 process."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch
from tests.distributed.launch import WORKERS, launch, read_ranks
from tests.factories import make_model, steering_records, without_seconds

WORKER = WORKERS / "ddp_worker.py"


def per_step(record: dict) -> dict[int, list[int]]:
    steps: dict[int, list[int]] = defaultdict(list)
    for step, indices in record["trained"]:
        steps[step].extend(indices)
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", ["mix", "select"])
def test_two_ranks_agree_and_match_one_process(tmp_path: Path, paradigm: str) -> None:
    launch(WORKER, tmp_path / "one", paradigm, nproc=1)
    launch(WORKER, tmp_path / "two", paradigm, nproc=2)
    (single,), (r0, r1) = read_ranks(tmp_path / "one", 1), read_ranks(tmp_path / "two", 2)
    # Identical plans (proportions / selections) on both ranks, equal to the 1-process run.
    assert r0["plans"] == r1["plans"] == single["plans"]
    # The ranks train disjoint shares of each step whose union is the 1-process step.
    one, a, b = per_step(single), per_step(r0), per_step(r1)
    assert sorted(one) == sorted(a) == sorted(b) == list(range(1, 8))
    for step in one:
        assert sorted(a[step] + b[step]) == sorted(one[step]), step
    # The event record (rank 0 writes it) matches too, timings aside.
    assert without_seconds(steering_records(tmp_path / "two" / "steering.jsonl")) == without_seconds(
        steering_records(tmp_path / "one" / "steering.jsonl")
    )


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", ["stream", "stream_select"])
def test_two_ranks_read_disjoint_rows_of_the_streams_and_train_the_one_process_stream(
    tmp_path: Path, paradigm: str
) -> None:
    launch(WORKER, tmp_path / "one", paradigm, nproc=1)
    launch(WORKER, tmp_path / "two", paradigm, nproc=2)
    (single,), (r0, r1) = read_ranks(tmp_path / "one", 1), read_ranks(tmp_path / "two", 2)
    assert r0["plans"] == r1["plans"] == single["plans"]
    # Selections from the streams' candidate windows: the same on both ranks; the first
    # (from the initial weights) equals the 1-process one, later ones come from DDP-averaged
    # weights (another float summation order), as in the composed test below.
    assert r0["selections"] == r1["selections"]
    assert r0["selections"][:2] == single["selections"][:2]
    assert len(single["selections"]) == (3 if paradigm == "stream_select" else 1)
    one, a, b = per_step(single), per_step(r0), per_step(r1)
    for step in range(1, 5 if paradigm == "stream_select" else 8):
        assert not set(a[step]) & set(b[step]), step
        assert sorted(a[step] + b[step]) == sorted(one[step]), step
    # The weights of each sample are those of one process (the global batch is the same).
    weights = {i: w for _, idx, ws in single["weights"] for i, w in zip(idx, ws, strict=True)}
    for _, idx, ws in r0["weights"] + r1["weights"]:
        for i, w in zip(idx, ws, strict=True):
            assert w == pytest.approx(weights[i], abs=1e-5)


@pytest.mark.slow
def test_odm_proportions_are_identical_on_both_ranks(tmp_path: Path) -> None:
    """ODM learns from losses: each rank sees only its share, the all-reduced statistics agree."""
    launch(WORKER, tmp_path / "two", "odm", nproc=2)
    launch(WORKER, tmp_path / "one", "odm", nproc=1)
    r0, r1 = read_ranks(tmp_path / "two", 2)
    assert r0["plans"] == r1["plans"]
    records = steering_records(tmp_path / "two" / "steering.jsonl")
    assert len(records) == 7 and len({tuple(r["proportions"].values()) for r in records}) > 1
    # Same statistics as one process up to float summation order, hence (nearly) the same proportions.
    single = steering_records(tmp_path / "one" / "steering.jsonl")
    for a, b in zip(records, single, strict=True):
        assert list(a["proportions"].values()) == pytest.approx(list(b["proportions"].values()), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", ["aioli", "aioli_eval", "ado"])
def test_learning_mixers_agree_on_both_ranks(tmp_path: Path, paradigm: str) -> None:
    """aioli (training or held-out losses) and ado learn from all-reduced statistics or gathered
    held-out losses: both ranks hold the same learned state, equal (up to float summation
    order) to one process's."""
    launch(WORKER, tmp_path / "two", paradigm, nproc=2)
    launch(WORKER, tmp_path / "one", paradigm, nproc=1)
    (r0, r1), (single,) = read_ranks(tmp_path / "two", 2), read_ranks(tmp_path / "one", 1)
    assert r0["plans"] == r1["plans"]
    assert r0["report"] == r1["report"]
    learned = "mixture" if paradigm.startswith("aioli") else "preference"
    assert r0["report"][learned] != pytest.approx([1 / 3] * 3)
    assert r0["report"][learned] == pytest.approx(single["report"][learned], abs=1e-4)
    two = steering_records(tmp_path / "two" / "steering.jsonl")
    one = steering_records(tmp_path / "one" / "steering.jsonl")
    assert len(two) == len(one) and len({tuple(r["proportions"].values()) for r in two}) > 2
    for a, b in zip(two, one, strict=True):
        assert list(a["proportions"].values()) == pytest.approx(list(b["proportions"].values()), abs=1e-4)


@pytest.mark.slow
def test_doremi_weights_are_identical_on_both_ranks(tmp_path: Path) -> None:
    """DoReMi's excess losses are all-reduced before each weight update: both ranks hold the
    same domain weights, equal (up to float summation order) to one process's."""
    make_model(seed=1).save_pretrained(tmp_path / "ref")
    launch(WORKER, tmp_path / "two", "doremi", nproc=2, DATASTEER_TEST_REFERENCE=str(tmp_path / "ref"))
    launch(WORKER, tmp_path / "one", "doremi", nproc=1, DATASTEER_TEST_REFERENCE=str(tmp_path / "ref"))
    (r0, r1), (single,) = read_ranks(tmp_path / "two", 2), read_ranks(tmp_path / "one", 1)
    assert r0["learned"] == r1["learned"] and r0["learned"] != pytest.approx([1 / 3] * 3)
    assert r0["learned"] == pytest.approx(single["learned"], abs=1e-6)
    two = steering_records(tmp_path / "two" / "steering.jsonl")
    one = steering_records(tmp_path / "one" / "steering.jsonl")
    for a, b in zip(two, one, strict=True):
        assert list(a["alpha"].values()) == pytest.approx(list(b["alpha"].values()), abs=1e-6)


@pytest.mark.slow
def test_sharded_model_operations_equal_one_process(tmp_path: Path) -> None:
    """Each rank computes its share; the gathered losses, embeddings and gradient features
    are the same on both ranks and equal the 1-process result."""
    launch(WORKERS / "ops_worker.py", tmp_path / "one", nproc=1)
    launch(WORKERS / "ops_worker.py", tmp_path / "two", nproc=2)
    single = torch.load(tmp_path / "one.rank0")
    ranks = [torch.load(tmp_path / f"two.rank{r}") for r in (0, 1)]
    for key, value in single.items():
        assert value.shape[0] == 19, key
        for got in ranks:
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", ["near", "less", "cluster_less", "nice", "rho_loss", "greats"])
def test_model_based_selections_agree_across_ranks(tmp_path: Path, paradigm: str) -> None:
    """Both ranks serve one selection (rank 0's, broadcast). The first is computed from the
    initial weights, so it equals the 1-process selection exactly; later ones come from
    weights that DDP's gradient averaging changed in the last float bits, so near-ties may
    order differently and they are compared by overlap. (rho_loss and greats draw their
    candidates from passes over the pool that live in their state: the same on every rank.)"""
    make_model(seed=1).save_pretrained(tmp_path / "ref")  # rho_loss's IL model
    env = {"DATASTEER_TEST_REFERENCE": str(tmp_path / "ref")}
    launch(WORKER, tmp_path / "one", paradigm, nproc=1, **env)
    launch(WORKER, tmp_path / "two", paradigm, nproc=2, **env)
    single, r0, r1 = (r["plans"] for r in [*read_ranks(tmp_path / "one", 1), *read_ranks(tmp_path / "two", 2)])
    assert r0 == r1
    assert [s for s, _ in r0] == [s for s, _ in single] == [1, 2, 5]  # warm-up, then updates 0 and 1
    r0, single = r0[1:], single[1:]
    (_, first_two), (_, first_one) = r0[0], single[0]
    assert first_two == first_one
    for (_, two), (_, one) in zip(r0[1:], single[1:], strict=True):
        assert len(set(two) & set(one)) >= 0.75 * len(one)


def weights_by_sample(record: dict) -> dict[tuple[int, int], float]:
    """(step, pool index) -> the loss weight it trained with (indices repeat across steps only)."""
    return {(step, i): w for step, indices, ws in record["weights"] for i, w in zip(indices, ws, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("weighter", ["loss", "adapt", "reducible", "custom"])
def test_weights_over_two_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path: Path, weighter: str) -> None:
    """Micro-batch 2 on each of 2 ranks: the weighter sees both ranks' samples (losses,
    embeddings, reference losses all-gathered), so every sample gets the weight one process
    with micro-batch 4 gives it (for `loss`, a softmax over the 4 samples)."""
    make_model(seed=1).save_pretrained(tmp_path / "ref")
    env = {"DATASTEER_TEST_REFERENCE": str(tmp_path / "ref")}
    launch(WORKER, tmp_path / "one", f"weight_{weighter}", nproc=1, **env)
    launch(WORKER, tmp_path / "two", f"weight_{weighter}", nproc=2, **env)
    (single,), (r0, r1) = read_ranks(tmp_path / "one", 1), read_ranks(tmp_path / "two", 2)
    one = weights_by_sample(single)
    two = {**weights_by_sample(r0), **weights_by_sample(r1)}
    assert len(one) == 7 * 8 and two.keys() == one.keys()
    first = [k for k in one if k[0] == 1]
    assert max(one[k] for k in first) > 1.05 * min(one[k] for k in first)  # the weights do differ
    assert [two[k] for k in first] == pytest.approx([one[k] for k in first], rel=1e-5)  # same model at step 1
    for key, value in one.items():  # later steps: DDP-averaged weights differ in the last float bits
        assert two[key] == pytest.approx(value, rel=1e-3), key
    per_rank = [len(r["weights"]) for r in (r0, r1)]
    assert per_rank == [14, 14]  # 7 steps x 2 micro-batches each, weighted on both ranks


@pytest.mark.slow
def test_a_composed_run_agrees_on_every_decision_across_ranks(tmp_path: Path) -> None:
    """mix/random + select/loss (within each domain) + weight/loss on 2 ranks: both ranks hold
    the same proportions and selections and train the 1-process steps; the first selection
    (from the initial weights) equals the 1-process one."""
    launch(WORKER, tmp_path / "one", "compose", nproc=1)
    launch(WORKER, tmp_path / "two", "compose", nproc=2)
    (single,), (r0, r1) = read_ranks(tmp_path / "one", 1), read_ranks(tmp_path / "two", 2)
    assert r0["plans"] == r1["plans"] == single["plans"]  # proportions
    assert r0["selections"] == r1["selections"]
    assert [s for s, _ in r0["selections"]] == [s for s, _ in single["selections"]] == [1, 2, 5]
    assert r0["selections"][1] == single["selections"][1]
    records = steering_records(tmp_path / "two" / "steering.jsonl")
    assert {r["paradigm"] for r in records} == {"mix", "select", "weight"}
    a, b, one = per_step(r0), per_step(r1), per_step(single)
    for step in (1, 2, 3, 4):  # before any DDP-averaged difference could reach a selection
        assert sorted(a[step] + b[step]) == sorted(one[step]), step
