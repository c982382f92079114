"""Selectors on streamed domains: each update chooses from a candidate window of every
stream, the sampler serves the chosen rows and the stream continues after the window.

Hand-worked setting used throughout: 2 domains, a global batch of 4 and proportions
(1/2, 1/2), so every step takes exactly 2 rows of each domain (systematic counts of 4 x 1/2
are whole, whatever the offset).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from datasteer.config import load_steering
from datasteer.controller import SteeringController
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.plan import build_plan
from datasteer.samplers import MixtureSampler
from datasteer.streams import decode, encode
from tests.fakes import FakeOps

HALF = np.array([0.5, 0.5])


def sampler() -> MixtureSampler:
    s = MixtureSampler(None, 2, global_batch=4, seed=3, steps_per_epoch=20)
    s.add_plan(1, HALF)
    return s


def rows_of(indices: np.ndarray, domain: int) -> list[int]:
    domains, positions = decode(indices, 2)
    return sorted(positions[domains == domain].tolist())


def stream(domain: int, positions: list[int]) -> np.ndarray:
    return encode(np.full(len(positions), domain), np.array(positions), 2)


def test_the_chosen_rows_are_served_and_the_stream_continues_after_the_window() -> None:
    s = sampler()
    assert rows_of(s.indices_for_step(1), 0) == [0, 1]
    # Registered before step 2 is drawn: the windows start where step 3 finds the streams.
    assert s.stream_position(3).tolist() == [4, 4]
    chosen = np.concatenate([stream(0, [5, 9]), stream(1, [4, 6, 7])])
    s.add_selection(3, chosen, window_end=np.array([10, 8]))  # windows [4, 10) and [4, 8)
    assert rows_of(s.indices_for_step(2), 0) == [2, 3]
    step3, step4 = s.indices_for_step(3), s.indices_for_step(4)
    assert rows_of(step3, 0) == [5, 9] and rows_of(step4, 0) == [5, 9]  # 2 selected rows, drawn twice over
    assert set(rows_of(step3, 1)) <= {4, 6, 7} and set(rows_of(step4, 1)) <= {4, 6, 7}
    assert set(rows_of(step3, 1) + rows_of(step4, 1)) == {4, 6, 7}  # each once before any repeat
    assert s.stream_position(5).tolist() == [10, 8]  # after the windows, nothing else read
    assert rows_of(s.indices_for_step(5), 0) == [5, 9]  # the selection stays in force until the next


def test_a_domain_without_chosen_rows_takes_its_streams_next_rows() -> None:
    s = sampler()
    s.add_selection(3, stream(0, [6, 7]), window_end=np.array([8, 4]))  # domain 1: no window
    served = [s.indices_for_step(step) for step in range(1, 6)]
    assert [rows_of(b, 1) for b in served] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert s.stream_position(6).tolist() == [8, 10]
    # The next window of domain 0 starts after the first; domain 1's where its stream stands.
    s.add_selection(6, np.concatenate([stream(0, [8]), stream(1, [12])]), window_end=np.array([9, 13]))
    assert s.stream_position(7).tolist() == [9, 13]


def test_stream_positions_and_windows_survive_a_resume() -> None:
    full, part = sampler(), sampler()
    for s in (full, part):
        s.add_selection(3, np.concatenate([stream(0, [5, 9]), stream(1, [4, 6, 7])]), window_end=np.array([10, 8]))
        s.add_selection(6, stream(0, [11, 14]), window_end=np.array([16, 8]))
    expected = [full.indices_for_step(step).tolist() for step in range(1, 10)]
    for step in range(1, 5):
        part.indices_for_step(step)
    state = part.state_dict(4)
    assert state["stream_positions"].tolist() == [10, 8]
    resumed = MixtureSampler(None, 2, global_batch=4, seed=3, steps_per_epoch=20)
    resumed.load_state_dict(state)
    assert [resumed.indices_for_step(step).tolist() for step in range(5, 10)] == expected[4:]
    assert resumed.stream_position(10).tolist() == full.stream_position(10).tolist() == [16, 16]


@pytest.mark.parametrize(
    ("chosen", "end", "error", "match"),
    [
        (stream(0, [5]), None, SteeringStateError, "end of its candidate windows"),
        (stream(0, [5]), np.array([3, 4]), ValueError, "do not follow"),
        (stream(0, [12]), np.array([10, 4]), ValueError, "candidate window"),
        (stream(1, [2]), np.array([10, 4]), ValueError, "candidate window"),  # before the window: served already
    ],
)
def test_a_selection_outside_its_window_is_refused(chosen: np.ndarray, end: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        sampler().add_selection(3, chosen, window_end=end)


# -- through the controller, with the rho_loss selector and known losses -------------------
BLOCK = {
    "mix": {"algorithm": "static", "params": {"proportions": [0.5, 0.5]}},
    "select": {
        "algorithm": "rho_loss",
        "params": {"reference_model": "il"},
        "warmup_steps": 2,
        "update_every": 2,
        "stream_window": 3,
    },
}
#: Loss of stream index i (distinct values in no simple order); irreducible losses 0, so
#: rho_loss keeps the highest losses of each window.
LOSSES = torch.tensor([(i * 37) % 101 + 0.001 * i for i in range(200)])


def controller(block: dict[str, Any] = BLOCK) -> SteeringController:
    plan = build_plan(load_steering(block))
    return SteeringController(
        plan, domains=None, domain_names=("a", "b"), global_batch=4, seed=5, lag=1, stream_steps=8
    )


def drive(ctrl: SteeringController, ops: FakeOps, steps: range) -> tuple[dict[int, np.ndarray], list[dict[str, Any]]]:
    """Draw and 'train' ``steps``, deciding after each as the callback does."""
    assert ctrl.sampler is not None
    served, records = {}, []
    if steps.start == 1:
        records += ctrl.begin(8, lambda: ops)
    for step in steps:
        served[step] = ctrl.sampler.indices_for_step(step)
        records += ctrl.step_end(step, lambda: ops)
    return served, records


def top_losses(domain: int, start: int, rows: int, k: int) -> list[int]:
    positions = list(range(start, start + rows))
    return sorted(sorted(positions, key=lambda p: -float(LOSSES[p * 2 + domain]))[:k])


def test_each_update_keeps_the_best_rows_of_a_fresh_window_of_each_stream() -> None:
    ops = FakeOps(losses=LOSSES, reference_losses=torch.zeros(200))
    served, records = drive(controller(), ops, range(1, 9))
    selections = [r for r in records if r["paradigm"] == "select"]
    # warm-up: 2 steps x 2 rows of each stream; then windows of 3 x (2 steps x 2 rows) = 12 rows
    assert [r["window_start"] for r in selections] == [{"a": 4 + 12 * u, "b": 4 + 12 * u} for u in range(3)]
    assert all(r["window_rows"] == {"a": 12, "b": 12} for r in selections)
    assert [r["first_step"] for r in selections] == [3, 5, 7]
    for d in (0, 1):
        assert rows_of(np.concatenate([served[1], served[2]]), d) == [0, 1, 2, 3]
        for u, first in enumerate((3, 5, 7)):
            trained = rows_of(np.concatenate([served[first], served[first + 1]]), d)
            assert trained == top_losses(d, 4 + 12 * u, 12, 4)  # each kept row trained once
    # every row of both windows scored: irreducible losses are computed afresh for each window
    assert [r["irreducible_computed"] for r in selections] == [24, 24, 24]


def test_a_domain_whose_selector_finds_nothing_takes_its_window_in_stream_order() -> None:
    losses = LOSSES.clone()
    losses[1::2] = float("nan")  # every row of domain b
    served, records = drive(controller(), FakeOps(losses=losses, reference_losses=torch.zeros(200)), range(1, 9))
    assert all(r.get("kept") for r in records if r["paradigm"] == "select")
    assert rows_of(np.concatenate(list(served.values())), 1) == list(range(16))  # b: its stream, in order
    assert records[1]["window_start"]["b"] == 4 and records[1]["window_rows"]["b"] == 0  # nothing taken out of b
    assert rows_of(np.concatenate([served[3], served[4]]), 0) == top_losses(0, 4, 12, 4)


def test_a_resumed_streamed_selection_continues_exactly() -> None:
    full_served, full_records = drive(
        controller(), FakeOps(losses=LOSSES, reference_losses=torch.zeros(200)), range(1, 9)
    )
    ops = FakeOps(losses=LOSSES, reference_losses=torch.zeros(200))
    first = controller()
    _, part_records = drive(first, ops, range(1, 5))
    state = first.state_dict(4)
    resumed = controller()
    resumed.load_state_dict(state)
    assert resumed.begin(8, lambda: ops) == []
    served, records = drive(resumed, ops, range(5, 9))
    assert {s: served[s].tolist() for s in served} == {s: full_served[s].tolist() for s in range(5, 9)}
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in (*part_records, *records)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in full_records]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"algorithm": "delta_loss", "params": {}}, "delta_loss cannot choose from streamed"),
        ({"algorithm": "cluster_less", "params": {}}, "cluster_less cannot choose from streamed"),
        ({"max_updates": 2}, "max_updates"),
    ],
)
def test_selectors_that_need_the_whole_pool_are_refused_on_streams(change: dict[str, Any], match: str) -> None:
    block = {**BLOCK, "select": {**BLOCK["select"], **change}}
    with pytest.raises(ConfigError, match=match):
        controller(block)


def test_stream_window_is_refused_where_there_are_no_streams() -> None:
    plan = build_plan(load_steering(BLOCK))
    with pytest.raises(ConfigError, match="stream_window: applies to streamed domains only"):
        SteeringController(plan, domains=np.array([0, 1] * 8), domain_names=("a", "b"), global_batch=4, seed=5, lag=1)
    with pytest.raises(ConfigError, match="select stage only"):
        load_steering({"mix": {"algorithm": "static", "stream_window": 2}})
    with pytest.raises(ConfigError, match=">= 1"):
        load_steering({**BLOCK, "select": {**BLOCK["select"], "stream_window": 0.5}})


def test_each_stream_keeps_the_rows_of_the_windows_in_flight() -> None:
    # windows of 3 x (4 rows x 2 steps) = 24 rows; with lag 1 the next window is read while
    # the current one trains (2 in flight), plus a step's rows: 2 x 24 + 4
    assert controller().stream_rows == 52
    plan = build_plan(load_steering(BLOCK))
    late = SteeringController(
        plan, domains=None, domain_names=("a", "b"), global_batch=4, seed=5, lag=5, stream_steps=8
    )
    assert late.stream_rows == (2 + 5 // 2) * 24 + 4  # decided 5 steps ahead: 2 more windows in flight
