"""Streamed domains: stream indices, forward readers, and the mixture drawn from streams."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from datasteer.controller import SteeringController
from datasteer.errors import ConfigError
from datasteer.plan import build_plan
from datasteer.samplers import MixtureSampler
from datasteer.streams import StreamedDomains, decode, encode, open_stream
from tests.factories import DOMAINS, make_dataset, make_streams


class Counting:
    """An iterable over ``range(n)`` that counts how often it was opened and how far read."""

    def __init__(self, n: int) -> None:
        self.n, self.opened, self.read = n, 0, 0

    def __iter__(self) -> Iterator[int]:
        self.opened += 1
        for i in range(self.n):
            self.read += 1
            yield i


class Skipping(Counting):
    """Also has ``skip(k)``, as a ``datasets.IterableDataset`` has."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.skips: list[int] = []

    def skip(self, k: int) -> Any:
        self.skips.append(k)
        return range(k, self.n)


def test_an_index_names_a_domain_and_a_position_in_its_stream() -> None:
    domains, positions = np.array([0, 2, 1, 2]), np.array([0, 5, 7, 10**12])
    indices = encode(domains, positions, 3)
    assert indices.tolist() == [0, 17, 22, 3 * 10**12 + 2]
    back = decode(indices, 3)
    assert back[0].tolist() == domains.tolist() and back[1].tolist() == positions.tolist()


def test_a_resume_past_the_end_of_a_short_stream_finds_the_row_it_wrapped_to() -> None:
    # A resumed run's first row of a 5-row stream can be position 7 (row 2): a skip to 7
    # finds nothing, which says the stream is shorter, not that it has 7 rows.
    source = Skipping(5)
    streams = StreamedDomains({"a": source})
    assert [streams[7], streams[8], streams[13]] == [2, 3, 3]
    assert streams.lengths() == [5] and source.skips[0] == 7


def test_a_stream_is_read_forward_once_and_starts_over_at_its_end() -> None:
    a, b = Counting(5), Counting(3)
    streams = StreamedDomains({"a": a, "b": b}, keep=2)
    # a: positions 0, 1, 2 (indices 0, 2, 4); b: positions 0..4 wrap to rows 0 1 2 0 1
    assert [streams[i] for i in (0, 2, 4)] == [0, 1, 2]
    assert a.opened == 1 and a.read == 3
    assert [streams[2 * p + 1] for p in range(5)] == [0, 1, 2, 0, 1]
    assert streams.lengths() == [None, 3]
    assert streams[2 * 1] == 1 and a.opened == 1  # within the window (rows 1, 2): no re-read
    assert streams[2 * 0] == 0 and a.opened == 2  # before it: the stream restarts
    assert streams[2 * 9 + 1] == 0  # b's position 9 is row 9 mod 3
    assert streams.restarts() == [2, 2]  # b restarted once at its end; its row 0 was in the window


def test_rows_asked_for_out_of_order_within_the_window_are_read_once() -> None:
    a = Counting(100)
    streams = StreamedDomains({"a": a}, keep=8)
    for first in range(0, 96, 8):  # each step's 8 rows, shuffled
        assert [streams[first + i] for i in (5, 1, 7, 0, 3, 2, 6, 4)] == [first + i for i in (5, 1, 7, 0, 3, 2, 6, 4)]
    assert a.opened == 1 and a.read == 96


def test_a_stream_that_can_skip_restarts_at_the_row_asked_for() -> None:
    s = Skipping(10)
    streams = StreamedDomains({"s": s})
    assert streams[6] == 6 and s.skips == [6]  # a first read past the start skips to it
    assert streams[8] == 8 and s.skips == [6]  # then forward
    assert streams[2] == 2 and s.skips == [6, 2]


def test_an_empty_stream_is_an_error_naming_its_domain() -> None:
    with pytest.raises(ConfigError, match="'e' has no rows"):
        StreamedDomains({"a": [1], "e": []})[1]


def test_open_stream_reads_a_directory_in_name_order(tmp_path: Path) -> None:
    for name, rows in (("2.jsonl", [3, 4]), ("1.jsonl", [1, 2])):
        (tmp_path / name).write_text("".join(json.dumps({"x": r}) + "\n" for r in rows))
    assert [r["x"] for r in open_stream(tmp_path)] == [1, 2, 3, 4]
    assert [r["y"] for r in open_stream(tmp_path, lambda row: {"y": row["x"] * 10})] == [10, 20, 30, 40]


def test_streams_from_paths_transform_only_the_rows_asked_for(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"x": r}) + "\n" for r in range(8)))
    seen: list[int] = []

    def scale(row: dict[str, Any]) -> dict[str, Any]:
        seen.append(row["x"])
        return {"y": row["x"] * 10}

    streams = StreamedDomains.from_paths({"a": tmp_path / "a.jsonl"}, transform=scale)
    assert [streams[1], streams[6], streams[6]] == [{"y": 10}, {"y": 60}, {"y": 60}]
    assert seen == [1, 6]  # rows 0 and 2-5 were read past, never transformed


def test_open_stream_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        open_stream(tmp_path / "missing")
    with pytest.raises(ConfigError, match="holds no"):
        open_stream(tmp_path)
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.parquet").write_text("")
    with pytest.raises(ConfigError, match="must all be one of"):
        open_stream(tmp_path)


def test_streams_read_back_the_rows_written(tmp_path: Path) -> None:
    streams = make_streams(tmp_path, sizes=(4, 3, 2))
    rows = make_dataset((4, 3, 2)).to_list()
    gamma = [r for r in rows if r["domain"] == "gamma"]
    assert streams.domain_names == DOMAINS
    assert streams[encode(np.array(2), np.array(1), 3).item()]["input_ids"] == gamma[1]["input_ids"]


def stream_sampler(steps: int = 20) -> MixtureSampler:
    sampler = MixtureSampler(None, 3, global_batch=8, seed=3, steps_per_epoch=steps)
    sampler.add_plan(1, np.array([0.5, 0.3, 0.2]))
    sampler.add_plan(4, np.array([0.1, 0.1, 0.8]))
    return sampler


def test_the_mixture_takes_the_next_rows_of_each_stream() -> None:
    sampler = stream_sampler()
    taken: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for step in range(1, 8):
        domains, positions = decode(sampler.indices_for_step(step), 3)
        assert np.bincount(domains, minlength=3).tolist() == sampler.domain_counts(step).tolist()
        for d in range(3):
            taken[d].extend(sorted(positions[domains == d].tolist()))
    for d in range(3):  # every stream is read in order, without a gap or a repeat
        assert taken[d] == list(range(len(taken[d])))
    assert len(taken[2]) > len(taken[0])  # the later plan favours the third domain


def test_the_stream_positions_survive_a_resume() -> None:
    full = stream_sampler()
    expected = [full.indices_for_step(s).tolist() for s in range(1, 9)]
    part = stream_sampler()
    for step in range(1, 5):
        part.indices_for_step(step)
    state = part.state_dict(4)
    assert state["stream_positions"].tolist() != [0, 0, 0]
    resumed = MixtureSampler(None, 3, global_batch=8, seed=3, steps_per_epoch=20)
    resumed.load_state_dict(state)
    assert [resumed.indices_for_step(s).tolist() for s in range(5, 9)] == expected[4:]


@pytest.mark.parametrize(
    ("block", "steps", "match"),
    [
        ({"paradigm": "mix", "algorithm": "static"}, None, "max_steps"),
        ({"paradigm": "weight", "algorithm": "loss"}, 10, "need a mix stage"),
        ({"paradigm": "select", "algorithm": "random"}, 10, "need a mix stage"),
        ({"paradigm": "mix", "algorithm": "dynamic_moe"}, 10, "set source: eval"),
    ],
)
def test_streamed_domains_are_refused_where_they_cannot_work(
    block: dict[str, Any], steps: int | None, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        SteeringController(
            build_plan(block), domains=None, domain_names=DOMAINS, global_batch=8, seed=0, lag=1, stream_steps=steps
        )


def test_a_stream_opened_in_one_process_is_reopened_in_another(monkeypatch: pytest.MonkeyPatch) -> None:
    # A data loader worker forked after the parent read a candidate window must not read on
    # from the parent's open iterator (its files' offsets are shared); a spawned worker gets
    # the streams pickled, without the open iterator (a generator does not pickle).
    source = Skipping(10)
    streams = StreamedDomains({"a": source}, keep=2)
    assert [streams[0], streams[1], streams[2]] == [0, 1, 2]
    spawned = pickle.loads(pickle.dumps(streams))
    assert spawned[3] == 3 and spawned.restarts() == [2]
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as if in a forked worker
    assert streams[3] == 3 and streams.restarts() == [2] and source.skips[-1] == 3
    assert streams[4] == 4 and streams.restarts() == [2]  # its own iterator now: read on


def test_kept_rows_come_back_as_they_were_read() -> None:
    rows = [{"input_ids": [5, 2**40, -100], "text": "a", "mask": [], "scores": [0.5, 1]} for _ in range(3)]
    streams = StreamedDomains({"a": rows}, keep=4)
    first = streams[0]
    assert first == rows[0] and type(first["input_ids"][1]) is int
    again = streams[0]  # from the kept rows (packed): equal, and a fresh copy
    assert again == rows[0] and again is not first and again["input_ids"] is not first["input_ids"]
    again["input_ids"].append(7)
    assert streams[0] == rows[0]


def test_a_transform_runs_once_and_only_on_the_rows_asked_for() -> None:
    # Another rank's rows, and the rows of a candidate window a selection skips, are read
    # past without being transformed (tokenized).
    seen: list[int] = []

    def tokenize(row: dict[str, Any]) -> dict[str, Any]:
        seen.append(row["i"])
        return {"input_ids": [row["i"]] * 2}

    streams = StreamedDomains({"a": [{"i": i} for i in range(10)]}, transform=tokenize)
    assert [streams[0], streams[5], streams[5]] == [{"input_ids": [0, 0]}, {"input_ids": [5, 5]}, {"input_ids": [5, 5]}]
    assert streams[3] == {"input_ids": [3, 3]}  # read past earlier, transformed now
    assert seen == [0, 5, 3]
