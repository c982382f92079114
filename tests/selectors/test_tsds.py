"""TSDS: probabilities by hand, faiss padding, draws beyond the support, determinism, state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.ops.prepared import embedding_settings, pool_fingerprint, row_token_ids, write_prepared
from datasteer.selectors.tsds import TsdsParams, TsdsSelector, draw, kernel_density, tsds_probabilities
from tests.distributed.launch import WORKERS, launch
from tests.factories import make_model, select_context
from tests.fakes import FakeOps

INF = np.inf
# Three targets, six candidates, densities 1. Breakpoints: level 1 (every target's first
# neighbour full) then level 2. g_i(k) = d_{k+1} A(k) - B(k):
#   k = 0: T0 0.2 - 0.1 = 0.1, T1 0.3 - 0.1 = 0.2, T2 0.2 - 0.2 = 0
#   k = 1: T0 0.6 * 2 - 0.3 = 0.9, T1 0.4 * 2 - 0.4 = 0.4, T2 0.9 * 2 - 0.4 = 1.4
# Running sum after each breakpoint (level, k, target): 0.1, 0.3, 0.3, 1.1 (2, 1, T0), 1.3 (2, 1, T1).
# alpha 0.5, C 0.4: stop when 2.5 * sum >= 3 (M (1 - alpha) / (alpha / C)): 2.75 < 3 at 1.1,
# 3.25 >= 3 at 1.3, so the level is s = 2 and each cap is 1 / (M s) = 1/6:
#   T0 fills ids 0, 1 (1/6 each), nothing left for id 2;
#   T1 fills id 1 (1/6), the rest 1/3 - 1/6 goes to id 3; T2 fills id 5, the rest to id 4.
IDS = np.array([[0, 1, 2], [1, 3, 4], [5, 4, 0]])
DIST = np.array([[0.1, 0.2, 0.6], [0.1, 0.3, 0.4], [0.2, 0.2, 0.9]])
ONES = np.ones((3, 3))


def test_probabilities_by_hand() -> None:
    p = tsds_probabilities(IDS, DIST, ONES, 6, alpha=0.5, C=0.4)
    np.testing.assert_allclose(p, [1 / 6, 1 / 3, 0, 1 / 6, 1 / 6, 1 / 6], atol=1e-12)


def test_alpha_moves_between_alignment_and_diversity() -> None:
    # Strong alignment (huge alpha / C): stop at the first breakpoint; each target's nearest takes all.
    near = tsds_probabilities(IDS, DIST, ONES, 6, alpha=0.99, C=0.001)
    np.testing.assert_allclose(near, [1 / 3, 1 / 3, 0, 0, 0, 1 / 3], atol=1e-12)
    # Strong diversity: the lists end before the optimum; the level is the last breakpoint (2).
    spread = tsds_probabilities(IDS, DIST, ONES, 6, alpha=0.01, C=100.0)
    np.testing.assert_allclose(spread, [1 / 6, 1 / 3, 0, 1 / 6, 1 / 6, 1 / 6], atol=1e-12)


def test_density_discounts_near_duplicates() -> None:
    # One target; ids 0 and 1 are near-duplicates (density 2). A = [0.5, 1, 2], B = [0.05, 0.15, 0.45];
    # g = 0.2 * 0.5 - 0.05 = 0.05 at level 0.5, 0.3 * 1 - 0.15 = 0.15 at level 1.
    ids, dist, rho = np.array([[0, 1, 2]]), np.array([[0.1, 0.2, 0.3]]), np.array([[2.0, 2.0, 1.0]])
    # alpha / C / (1 - alpha) = 10: 0.5 < 1, then 1.5 >= 1 -> s = 1; cap of id 0 = 1 / (1 * 1 * 2).
    p = tsds_probabilities(ids, dist, rho, 3, alpha=0.5, C=0.1)
    np.testing.assert_allclose(p, [0.5, 0.5, 0.0])
    # = 100: stops at the first breakpoint, s = 0.5, id 0 holds everything.
    np.testing.assert_allclose(tsds_probabilities(ids, dist, rho, 3, alpha=0.5, C=0.01), [1.0, 0, 0])


def test_faiss_padding_is_dropped_not_read_as_the_last_candidate() -> None:
    # T2 has one neighbour (id 4); numpy would read its -1 entries as id 5 (the last candidate).
    ids = np.array([[0, 1, 2], [1, 3, 4], [4, -1, -1]])
    dist = np.array([[0.1, 0.2, 0.6], [0.1, 0.3, 0.4], [0.2, INF, INF]])
    p = tsds_probabilities(ids, dist, ONES, 6, alpha=0.5, C=0.4)
    # Sums 0.1, 0.3, 1.1, 1.3 as above without T2's breakpoints: s = 2 again; T2 sends 1/3 to id 4.
    np.testing.assert_allclose(p, [1 / 6, 1 / 3, 0, 1 / 6, 1 / 3, 0], atol=1e-12)


def test_target_without_neighbours_is_left_out() -> None:
    ids = np.array([[0, 1], [-1, -1]])
    p = tsds_probabilities(ids, np.array([[0.1, 0.5], [INF, INF]]), np.ones((2, 2)), 3, alpha=0.5, C=1e-6)
    np.testing.assert_allclose(p, [1.0, 0, 0])


def test_kernel_density_by_hand() -> None:
    d2 = np.array([[0.0, 0.25, 1.0], [0.0, INF, INF]])
    np.testing.assert_allclose(kernel_density(d2, 1.0), [1.75, 1.0])
    np.testing.assert_allclose(kernel_density(d2, 0.0), [1.0, 1.0])


def test_draw_without_replacement_within_the_support() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0], dtype=torch.float64)
    got = draw(probs, 4, torch.Generator().manual_seed(0))
    assert sorted(got.tolist()) == [0, 1, 2, 3]


def test_draw_more_than_the_support_takes_it_all_then_repeats() -> None:
    probs = torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=torch.float64)
    got = draw(probs, 7, torch.Generator().manual_seed(0)).tolist()
    assert len(got) == 7 and set(got) == {0, 2} and set(got[:2]) == {0, 2}


def test_draws_depend_only_on_the_generator() -> None:
    probs = torch.softmax(torch.arange(50, dtype=torch.float64) / 10, 0)
    a = draw(probs, 20, torch.Generator().manual_seed(3))
    b = draw(probs, 20, torch.Generator().manual_seed(3))
    c = draw(probs, 20, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_params() -> None:
    with pytest.raises(ConfigError, match="alpha: must lie in"):
        parse_dataclass(TsdsParams, {"prepared": "x", "alpha": 1.0}, "datasteer.params")
    with pytest.raises(ConfigError, match="prepared"):
        parse_dataclass(TsdsParams, {"prepared": " "}, "datasteer.params")
    with pytest.raises(ConfigError, match="C: must be > 0"):
        parse_dataclass(TsdsParams, {"prepared": "x", "C": 0}, "datasteer.params")
    with pytest.raises(ConfigError, match="prepared: required key is missing"):
        parse_dataclass(TsdsParams, {}, "datasteer.params")


# -- the online selector over a prepared file written by hand ---------------------------------

POOL = [{"input_ids": [i, i + 1]} for i in range(6)]
TARGETS = [{"input_ids": [9, 9]}]
MODEL = make_model()  # read for its architecture only (part of the fingerprint)


def fake_ops(pool: list[dict[str, list[int]]] = POOL) -> FakeOps:
    return FakeOps(dataset=pool, targets=[FakeOps(dataset=TARGETS)], model=MODEL)


def write(folder: Path, params: TsdsParams, probs: list[float]) -> None:
    """What ``datasteer prepare tsds`` writes for POOL, TARGETS and MODEL, with these probabilities."""
    settings = embedding_settings(params.settings(), MODEL)
    digest = pool_fingerprint(
        pool_ids=row_token_ids(POOL),
        domains=torch.zeros(6, dtype=torch.long),
        domain_names=("x",),
        target_ids=[row_token_ids(TARGETS)],
        settings=settings,
    )
    tensors = {"probabilities": torch.tensor(probs, dtype=torch.float64)}
    write_prepared(folder, "tsds", tensors, fingerprint=digest, settings=settings)


def test_selector_draws_from_the_prepared_support(tmp_path: Path) -> None:
    params = TsdsParams(prepared=str(tmp_path))
    write(tmp_path, params, [0.25, 0.25, 0, 0.5, 0, 0])
    selector = TsdsSelector(params)
    first = selector.select(select_context(ops=fake_ops(), num_samples=3))
    assert sorted(first.tolist()) == [0, 1, 3]
    more = selector.select(select_context(ops=fake_ops(), num_samples=5, update=1)).tolist()
    assert len(more) == 5 and set(more) == {0, 1, 3}


def test_same_update_same_draw_after_a_state_round_trip(tmp_path: Path) -> None:
    params = TsdsParams(prepared=str(tmp_path))
    write(tmp_path, params, [0.1, 0.2, 0.1, 0.3, 0.2, 0.1])
    a = TsdsSelector(params)
    a.select(select_context(ops=fake_ops(), num_samples=3))
    b = TsdsSelector(params)
    b.load_state_dict(a.state_dict())
    ctx_a, ctx_b = (select_context(ops=fake_ops(), num_samples=4, update=1) for _ in "ab")
    assert torch.equal(a.select(ctx_a), b.select(ctx_b))
    # The file changed since the checkpoint: the resumed run refuses it.
    write(tmp_path, params, [0.6, 0.2, 0.1, 0.1, 0, 0])
    c = TsdsSelector(params)
    c.load_state_dict(a.state_dict())
    with pytest.raises(SteeringStateError, match="changed since the checkpoint"):
        c.select(select_context(ops=fake_ops(), num_samples=4, update=1))


def test_selector_refuses_a_missing_or_foreign_file(tmp_path: Path) -> None:
    params = TsdsParams(prepared=str(tmp_path))
    ctx = select_context(ops=fake_ops(), num_samples=2)
    with pytest.raises(SteeringStateError, match="run `datasteer prepare tsds CONFIG`"):
        TsdsSelector(params).select(ctx)
    write(tmp_path, TsdsParams(prepared=str(tmp_path), sigma=0.5), [1 / 6] * 6)
    with pytest.raises(SteeringStateError, match="another pool or other settings"):
        TsdsSelector(params).select(ctx)
    write(tmp_path, params, [1 / 6] * 6)
    with pytest.raises(SteeringStateError, match="another pool"):
        TsdsSelector(params).select(select_context(ops=fake_ops(POOL[::-1]), num_samples=2))


@pytest.mark.slow
def test_two_ranks_draw_the_same_samples(tmp_path: Path) -> None:
    params = TsdsParams(prepared=str(tmp_path / "prep"))
    write(tmp_path / "prep", params, [0.1, 0.2, 0.1, 0.3, 0.2, 0.1])
    launch(WORKERS / "tsds_worker.py", tmp_path / "prep", tmp_path / "out", nproc=2)
    r0, r1 = (json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and len(r0) == 3 and all(len(p) == 8 for p in r0)
    assert r0[0] != r0[1]  # a fresh draw per update
