"""Training on streamed domains through the Hugging Face Trainer: the mixture reads each
stream in order, and a resume continues every stream where it stopped."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.factories import make_dataset, make_sft_dataset, make_streams, steering_records, without_seconds
from tests.integrations.test_hf_trainer import StopAt, run

from datasteer.errors import ConfigError
from datasteer.streams import decode

ODM = {"paradigm": "mix", "algorithm": "odm", "update_every": 1}
COMPOSED = {"mix": {"algorithm": "random", "update_every": 2}, "weight": {"algorithm": "loss"}, "seed": 5}
SELECT = {
    "mix": {"algorithm": "static"},
    "select": {"algorithm": "loss", "warmup_steps": 1, "update_every": 2, "stream_window": 3},
    "seed": 5,
}


def trained_positions(served: dict[int, list[int]]) -> dict[int, list[int]]:
    positions: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for step in sorted(served):
        domains, rows = decode(served[step], 3)
        for d in range(3):
            positions[d].extend(sorted(rows[domains == d].tolist()))
    return positions


def test_a_streamed_run_trains_each_streams_rows_in_order(tmp_path: Path) -> None:
    trainer = run(tmp_path / "out", ODM, max_steps=8, dataset=make_streams(tmp_path / "streams"))
    positions = trained_positions(trainer.served())
    assert sum(map(len, positions.values())) == 8 * 8
    for rows in positions.values():
        assert rows == list(range(len(rows)))
    records = steering_records(tmp_path / "out" / "steering.jsonl")
    assert len({tuple(r["proportions"].values()) for r in records if "proportions" in r}) > 1  # odm moved


def test_a_stream_shorter_than_the_run_starts_over(tmp_path: Path) -> None:
    streams = make_streams(tmp_path / "streams", sizes=(3, 3, 3))
    trainer = run(tmp_path / "out", {"paradigm": "mix", "algorithm": "static"}, max_steps=6, dataset=streams)
    assert sum(len(v) for v in trainer.served().values()) == 48  # 16 rows per domain from 3 each
    assert streams.lengths() == [3, 3, 3]


def check_windows(served: dict[int, list[int]], selections: list[dict[str, Any]], ratio: float) -> None:
    """Each update's trained rows lie in its candidate windows, of ``ceil(ratio x quota)`` rows."""
    for record in selections:
        steps = range(record["first_step"], record["last_step"] + 1)
        domains, rows = decode(np.concatenate([served[s] for s in steps]), 3)
        for d, name in enumerate(("alpha", "beta", "gamma")):
            start, size = record["window_start"][name], record["window_rows"][name]
            assert size == math.ceil(ratio * record["quotas"][name])
            assert ((rows[domains == d] >= start) & (rows[domains == d] < start + size)).all()
    # the windows follow each other: every stream continues after its previous window
    for before, after in itertools.pairwise(selections):
        ends = {n: before["window_start"][n] + before["window_rows"][n] for n in before["window_start"]}
        assert after["window_start"] == ends


def test_a_selector_on_streams_trains_rows_of_its_candidate_windows(tmp_path: Path) -> None:
    trainer = run(tmp_path / "out", SELECT, max_steps=7, dataset=make_streams(tmp_path / "streams"))
    selections = [r for r in steering_records(tmp_path / "out" / "steering.jsonl") if r["paradigm"] == "select"]
    assert [r["first_step"] for r in selections] == [2, 4, 6]
    check_windows(trainer.served(), selections, 3.0)  # stream_window: 3


def test_a_steered_trainer_keeps_the_rows_its_windows_have_in_flight(tmp_path: Path) -> None:
    from tests.factories import make_model, training_args
    from transformers import default_data_collator

    from datasteer.hf import SteeringTrainer

    streams = make_streams(tmp_path / "s", keep=1)
    args = training_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=7)
    trainer = SteeringTrainer(
        model=make_model(), args=args, train_dataset=streams, data_collator=default_data_collator, steering=SELECT
    )
    assert trainer.steering is not None
    # windows of 3 x (8 rows x 2 steps) = 48 rows, 2 in flight (lag 1), plus a step's 8 rows
    assert trainer.steering.stream_rows == 2 * 48 + 8
    assert [c.keep for c in streams._cursors] == [104, 104, 104]


#: Selectors that read the model (and target sets) on streams, each with small settings, and
#: the window ratio it gets (its own for greats: 1 / fraction).
MODEL_SELECTORS = {
    "random": ({}, 4.0),
    "less": ({"proj_dim": 256}, 4.0),
    "greats": ({"fraction": 0.5, "targets": 4, "proj_dim": 256}, 2.0),
    "near": ({"neighbours": 8}, 4.0),
    "nice": ({"proj_dim": 256, "mc_samples": 2, "max_new_tokens": 4, "reward": "token_f1"}, 4.0),
}


@pytest.mark.parametrize("algorithm", list(MODEL_SELECTORS))
def test_model_reading_selectors_choose_from_the_windows(tmp_path: Path, algorithm: str) -> None:
    params, ratio = MODEL_SELECTORS[algorithm]
    steering = {
        "mix": {"algorithm": "static"},
        "select": {"algorithm": algorithm, "warmup_steps": 1, "update_every": 2, "params": params},
        "seed": 5,
    }
    targets = make_sft_dataset(sizes=(0, 0, 5), seed=1) if algorithm == "nice" else make_dataset((0, 0, 6), seed=1)
    out = tmp_path / "out"
    trainer = run(
        out, steering, max_steps=5, dataset=make_streams(tmp_path / "s"), eval_dataset=targets.remove_columns("domain")
    )
    selections = [r for r in steering_records(out / "steering.jsonl") if r["paradigm"] == "select"]
    assert [r["first_step"] for r in selections] == [2, 4] and not any(r.get("kept") for r in selections)
    check_windows(trainer.served(), selections, ratio)


@pytest.mark.parametrize("steering", [ODM, COMPOSED, SELECT], ids=["odm", "random+loss weights", "static+loss select"])
def test_a_streamed_resume_matches_an_uninterrupted_run(tmp_path: Path, steering: dict[str, Any]) -> None:
    full = run(tmp_path / "full", steering, max_steps=9, save_steps=4, dataset=make_streams(tmp_path / "s1"))
    part = tmp_path / "part"
    run(part, steering, max_steps=9, save_steps=4, callbacks=[StopAt(6)], dataset=make_streams(tmp_path / "s2"))
    state = torch.load(part / "checkpoint-4" / "steering_state.pt", weights_only=False)
    if steering is not SELECT:
        assert int(state["sampler"]["stream_positions"].sum()) == 4 * 8  # the rows read from each stream by step 4
    resumed = run(
        part,
        steering,
        max_steps=9,
        save_steps=4,
        resume=str(part / "checkpoint-4"),
        dataset=make_streams(tmp_path / "s3"),
    )
    full_served = full.served()
    assert {s: full_served[s] for s in range(5, 10)} == resumed.served()
    assert without_seconds(steering_records(part / "steering.jsonl")) == without_seconds(
        steering_records(tmp_path / "full" / "steering.jsonl")
    )
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_streams_refuse_domain_labels(tmp_path: Path) -> None:
    from tests.factories import make_model, training_args
    from transformers import default_data_collator

    from datasteer.hf import SteeringTrainer

    with pytest.raises(ConfigError, match="name their own domains"):
        SteeringTrainer(
            model=make_model(),
            args=training_args(tmp_path, max_steps=2),
            train_dataset=make_streams(tmp_path / "s"),
            data_collator=default_data_collator,
            steering=ODM,
            domains=np.zeros(3, dtype=np.int64),
        )
