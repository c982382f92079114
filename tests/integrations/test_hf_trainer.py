"""End-to-end tiny runs of each paradigm through the Hugging Face Trainer."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.factories import make_dataset, make_model, select_context, steering_records, training_args, without_seconds
from transformers import TrainerCallback, default_data_collator

from datasteer.controller import digest
from datasteer.errors import SteeringStateError, TrainingDivergedError
from datasteer.hf import STATE_FILE, SteeringTrainer
from datasteer.ops import INDEX_KEY
from datasteer.registry import WEIGHTERS
from datasteer.runlog import read_records
from datasteer.selectors.random import RandomSelector, RandomSelectParams
from datasteer.weighters.base import WeightContext, Weighter

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class RecordingTrainer(SteeringTrainer):
    """Records, per micro-batch, the optimizer step, the pool indices and the loss backpropagated."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.micro: list[tuple[int, list[int], float]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
        indices = inputs[INDEX_KEY].tolist()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.micro.append((self.state.global_step + 1, indices, float(loss)))
        return loss

    def served(self) -> dict[int, list[int]]:
        steps: dict[int, list[int]] = defaultdict(list)
        for step, indices, _ in self.micro:
            steps[step].extend(indices)
        return dict(steps)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def run(
    out: Path,
    steering: dict[str, Any],
    *,
    bs: int = 4,
    ga: int = 2,
    max_steps: int = 10,
    save_steps: int = 1000,
    dataset=None,
    callbacks=(),
    resume: str | None = None,
    workers: int = 0,
    eval_dataset=None,
    **args: Any,
) -> RecordingTrainer:
    """The tiny steered run; ``args`` are more ``TrainingArguments`` (e.g. a learning rate)."""
    arguments = training_args(
        out,
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        max_steps=max_steps,
        logging_steps=1,
        save_steps=save_steps,
        dataloader_num_workers=workers,
        **args,
    )
    trainer = RecordingTrainer(
        model=make_model(),
        args=arguments,
        train_dataset=dataset if dataset is not None else make_dataset(),
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        steering=steering,
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def build(out: Path, steering: dict[str, Any], **kwargs: Any) -> SteeringTrainer:
    """A steered trainer on the tiny model and data, built but not trained (for the checks
    made when it is built); ``kwargs`` go to the trainer, ``args`` defaults to one step."""
    kwargs.setdefault("args", training_args(out, max_steps=1))
    return SteeringTrainer(
        model=make_model(),
        train_dataset=make_dataset(),
        data_collator=default_data_collator,
        steering=steering,
        **kwargs,
    )


def test_the_closing_record_puts_the_last_window_on_record(tmp_path: Path) -> None:
    """A static mixture decides once, before step 1: without the closing record, nothing
    served would be on record."""
    trainer = run(tmp_path, {"paradigm": "mix", "algorithm": "static"}, max_steps=5)
    records = read_records(tmp_path / "steering.jsonl")
    assert [r["paradigm"] for r in records] == ["mix", "end"]
    assert sum(records[0]["served"].values()) == 0
    domains = make_dataset()["domain"]
    served = Counter(domains[i] for batch in trainer.served().values() for i in batch)
    assert sum(records[-1]["served"].values()) == 5 * 8 == sum(served.values())
    assert records[-1]["step"] == 5


def test_select_serves_exactly_the_selected_indices(tmp_path: Path) -> None:
    steering = {"paradigm": "select", "algorithm": "random", "warmup_steps": 2, "update_every": 3, "seed": 11}
    trainer = run(tmp_path, steering, max_steps=11)
    served = trainer.served()
    records = steering_records(tmp_path / "steering.jsonl")
    assert [r["update"] for r in records] == [0, 1, 2]
    pool = len(make_dataset())
    # Warm-up steps 1-2 come from a shuffle of the whole pool: no repeats.
    warm = served[1] + served[2]
    assert len(set(warm)) == len(warm) == 16
    for record in records:
        first, last = record["first_step"], record["last_step"]
        n = 8 * (last - first + 1)
        ctx = select_context(
            num_samples=n,
            pool_size=pool,
            update=record["update"],
            total_updates=len(records),
            seed=11,
            step=record["step"],
            first_step=first,
            last_step=last,
            max_steps=11,
        )
        expected = RandomSelector(RandomSelectParams()).select(ctx).numpy()
        assert record["digest"] == digest(expected)
        assert record["selected"] == n
        trained = [i for s in range(first, last + 1) for i in served[s]]
        assert Counter(trained) == Counter(expected.tolist())


def test_mix_domain_counts_follow_the_proportions_in_force(tmp_path: Path) -> None:
    steering = {"paradigm": "mix", "algorithm": "random", "update_every": 2, "seed": 5}
    trainer = run(tmp_path, steering, bs=4, ga=3, max_steps=9)
    records = steering_records(tmp_path / "steering.jsonl")
    domains = np.array(make_dataset()["domain"])
    names = ("alpha", "beta", "gamma")
    checked = 0
    for step, indices in trainer.served().items():
        (record,) = [r for r in records if r["first_step"] <= step <= r["last_step"]]
        counts = Counter(domains[indices].tolist())
        for name in names:
            target = 12 * record["proportions"][name]
            assert np.floor(target) - 1e-9 <= counts.get(name, 0) <= np.ceil(target) + 1e-9, (step, name)
        checked += 1
    assert checked == 9
    # The realised counts are reported in the records too.
    total_served = Counter()
    for r in records:
        total_served.update(r["served"])
    # Each record reports the samples trained since the previous one, up to its own step.
    assert sum(total_served.values()) == 12 * records[-1]["step"]


@dataclasses.dataclass
class _IndexWeightParams:
    pass


@pytest.fixture
def index_weighter():
    @WEIGHTERS.register("_test_index")
    class IndexWeighter(Weighter):
        """Test weighter: w = 1 + index % 3."""

        Params = _IndexWeightParams

        def weigh(self, ctx: WeightContext) -> torch.Tensor:
            return (1 + ctx.indices % 3).to(ctx.losses.dtype)

    yield "_test_index"
    WEIGHTERS._specs.pop("_test_index")


def ragged_dataset():
    """Rows with different numbers of labelled tokens (per-sample mean != token mean)."""
    ds = make_dataset()
    rng = np.random.default_rng(7)

    def mask(row, i):
        keep = rng.integers(3, len(row["labels"]) + 1)
        row["labels"] = [t if j < keep else -100 for j, t in enumerate(row["labels"])]
        return row

    return ds.map(mask, with_indices=True)


@pytest.mark.parametrize("algorithm", ["_test_index", "uniform"])
def test_weighted_loss_equals_hand_computation(tmp_path: Path, index_weighter: str, algorithm: str) -> None:
    """Ragged rows (per-sample mean != token mean): the loss is (1/B) sum w_i l_i exactly; with
    uniform weights, the plain mean of the per-sample token-mean losses."""
    dataset = ragged_dataset()
    trainer = run(tmp_path, {"paradigm": "weight", "algorithm": algorithm}, bs=4, ga=2, max_steps=1, dataset=dataset)
    model = make_model()  # the weights every micro-batch of step 1 saw
    assert len(trainer.micro) == 2
    for _, indices, loss in trainer.micro:
        rows = [dataset[i] for i in indices]
        ids = torch.tensor([r["input_ids"] for r in rows])
        labels = torch.tensor([r["labels"] for r in rows])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        per_sample = []
        for b in range(len(rows)):
            keep = labels[b, 1:] != -100
            per_sample.append(F.cross_entropy(logits[b, :-1][keep], labels[b, 1:][keep]))
        weights = torch.tensor([1.0 + i % 3 if algorithm == index_weighter else 1.0 for i in indices])
        expected = (weights * torch.stack(per_sample)).sum() / len(rows) / 2  # / accumulation steps
        assert loss == pytest.approx(float(expected), rel=1e-5)
    (record,) = steering_records(tmp_path / "steering.jsonl")
    all_w = [1.0 + i % 3 if algorithm == index_weighter else 1.0 for _, idx, _ in trainer.micro for i in idx]
    assert record["weight_mean"] == pytest.approx(np.mean(all_w))
    assert record["weight_min"] == min(all_w) and record["weight_max"] == max(all_w)


@pytest.mark.parametrize(("algorithm", "micro"), [("_test_index", 4), ("uniform", 8), ("adapt", 8)])
def test_accumulation_1xn_equals_nx1(tmp_path: Path, index_weighter: str, algorithm: str, micro: int) -> None:
    steering: dict[str, Any] = {"paradigm": "weight", "algorithm": algorithm}
    if algorithm == "adapt":
        steering["params"] = {"refresh_every": 2, "tau": 0.2}
    dataset = ragged_dataset()
    anchors = make_dataset((2, 2, 2), seed=5)
    a = run(tmp_path / "a", steering, bs=1, ga=micro, max_steps=3, dataset=dataset, eval_dataset=anchors)
    b = run(tmp_path / "b", steering, bs=micro, ga=1, max_steps=3, dataset=dataset, eval_dataset=anchors)
    # The default (random) sampler of the weight paradigm follows the global batch: same data.
    assert {s: sorted(v) for s, v in a.served().items()} == {s: sorted(v) for s, v in b.served().items()}
    loss_a = defaultdict(float)
    loss_b = defaultdict(float)
    for step, _, loss in a.micro:
        loss_a[step] += loss
    for step, _, loss in b.micro:
        loss_b[step] += loss
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


#: Params of the online batch selectors in these runs ("REFERENCE": see :func:`with_reference`).
RHO_PARAMS = {"reference_model": "REFERENCE", "fraction": 0.25}
GREATS_PARAMS = {"fraction": 0.25, "targets": 4, "proj_dim": 64}


def with_reference(steering: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The block with every ``"REFERENCE"`` replaced by a reference model saved under ``folder``."""
    text = json.dumps(steering)
    if '"REFERENCE"' not in text:
        return steering
    make_model(seed=1).save_pretrained(folder / "reference")
    block: dict[str, Any] = json.loads(text.replace('"REFERENCE"', json.dumps(str(folder / "reference"))))
    return block


#: One random mixer and one random selector run: the record and stream depend on the seed only.
RANDOM_RUNS = [
    {"paradigm": "mix", "algorithm": "random", "update_every": 2},
    {"paradigm": "select", "algorithm": "random", "warmup_steps": 1, "update_every": 3},
]

#: Mixers that learn from the training losses, sized to the 12-step runs below: aioli's rounds of
#: 5 steps (LearnParams on steps 1-3, 6-8, 11-12); ado's laws refitted every 3 steps from step 3.
AIOLI = {
    "algorithm": "aioli",
    "params": {"round_steps": 5, "interval_steps": 1, "sweeps": 1, "one_hot_factor": 0.6, "eta": 1.0},
}
ADO = {
    "algorithm": "ado",
    "warmup_steps": 2,
    "params": {"prior": "uniform", "ignore_steps": 0, "fit_every": 3, "fit_stride": 1, "smoothing_window": 5},
}


@pytest.mark.parametrize("steering", RANDOM_RUNS, ids=["mix", "select"])
def test_same_seed_gives_the_same_record(tmp_path: Path, steering: dict[str, Any]) -> None:
    a = run(tmp_path / "a", steering, max_steps=6)
    b = run(tmp_path / "b", steering, max_steps=6)
    assert without_seconds(steering_records(tmp_path / "a" / "steering.jsonl")) == without_seconds(
        steering_records(tmp_path / "b" / "steering.jsonl")
    )
    assert a.served() == b.served()


@pytest.mark.parametrize(
    "steering",
    [*RANDOM_RUNS, {"paradigm": "mix", **AIOLI}, {"paradigm": "mix", **ADO}],
    ids=["mix", "select", "aioli", "ado"],
)
def test_resume_matches_an_uninterrupted_run(tmp_path: Path, steering: dict[str, Any]) -> None:
    # max_steps 12 with a pool of 80 and batch 8 crosses an epoch boundary (10 steps/epoch).
    full = run(tmp_path / "full", steering, max_steps=12, save_steps=4)
    part = tmp_path / "part"
    run(part, steering, max_steps=12, save_steps=4, callbacks=[StopAt(6)])
    assert (part / "checkpoint-4" / "steering_state.pt").is_file()
    resumed = run(part, steering, max_steps=12, save_steps=4, resume=str(part / "checkpoint-4"))
    full_served = full.served()
    assert {s: full_served[s] for s in range(5, 13)} == resumed.served()
    assert without_seconds(steering_records(part / "steering.jsonl")) == without_seconds(
        steering_records(tmp_path / "full" / "steering.jsonl")
    )


@pytest.mark.parametrize(
    "steering",
    [
        {"paradigm": "weight", "algorithm": "uniform"},
        {"paradigm": "weight", "algorithm": "loss", "warmup_steps": 2, "params": {"temperature_end": 0.5}},
        {"paradigm": "weight", "algorithm": "adapt", "params": {"refresh_every": 3, "center": True, "tau": 0.1}},
        {"paradigm": "weight", "algorithm": "reducible", "params": {"reference_model": "REFERENCE"}},
        {
            "paradigm": "weight",
            "algorithm": "custom",
            "params": {"path": str(EXAMPLES / "custom_weighter.py:DomainWeighter"), "params": {"weights": {"beta": 3}}},
        },
        {
            "mix": {"algorithm": "random", "update_every": 2},
            "select": {"algorithm": "random", "warmup_steps": 1, "update_every": 3},
            "weight": {"algorithm": "loss"},
        },
        {"mix": AIOLI, "weight": {"algorithm": "loss"}},
        {"mix": ADO, "weight": {"algorithm": "loss"}},
        # Online batch selection, a new selection every step: 32 candidates of the 80-row
        # pool per step (the checkpoint holds the pass order and the irreducible losses).
        {"paradigm": "select", "algorithm": "rho_loss", "update_every": 1, "params": RHO_PARAMS},
        {"paradigm": "select", "algorithm": "greats", "update_every": 1, "params": GREATS_PARAMS},
        {
            "select": {"algorithm": "rho_loss", "update_every": 1, "params": RHO_PARAMS},
            "weight": {"algorithm": "loss"},
        },
        {  # within each domain: one pass and one set of irreducible losses per domain
            "mix": {"algorithm": "random", "update_every": 2},
            "select": {"algorithm": "rho_loss", "update_every": 1, "params": RHO_PARAMS},
        },
    ],
    ids=[
        "uniform",
        "loss",
        "adapt",
        "reducible",
        "custom",
        "mix+select+weight",
        "aioli+loss",
        "ado+loss",
        "rho_loss",
        "greats",
        "rho+weight",
        "mix+rho",
    ],
)
def test_weighted_resume_matches_an_uninterrupted_run(tmp_path: Path, steering: dict[str, Any]) -> None:
    steering = with_reference(steering, tmp_path)
    anchors = make_dataset((2, 2, 2), seed=5)
    full = run(tmp_path / "full", steering, max_steps=9, save_steps=4, eval_dataset=anchors)
    part = tmp_path / "part"
    run(part, steering, max_steps=9, save_steps=4, callbacks=[StopAt(6)], eval_dataset=anchors)
    resumed = run(part, steering, max_steps=9, save_steps=4, resume=str(part / "checkpoint-4"), eval_dataset=anchors)
    records = without_seconds(steering_records(tmp_path / "full" / "steering.jsonl"))
    assert without_seconds(steering_records(part / "steering.jsonl")) == records
    varied = any("weight_min" in r and r["weight_min"] < r["weight_max"] for r in records)
    weighted = "weight" in steering or steering.get("paradigm") == "weight"
    assert varied == (weighted and steering.get("algorithm") != "uniform")
    full_served = full.served()
    assert {s: full_served[s] for s in range(5, 10)} == resumed.served()
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_learning_mixers_move_off_uniform_on_their_own_proportions(tmp_path: Path) -> None:
    """aioli: the LearnParams steps serve the perturbed mixtures, then p^t; ado: its fitted laws."""
    run(tmp_path / "aioli", {"paradigm": "mix", **AIOLI}, max_steps=7)
    records = steering_records(tmp_path / "aioli" / "steering.jsonl")
    plan = {r["first_step"]: r for r in records}
    assert sorted(max(plan[s]["proportions"].values()) for s in (1, 2, 3)) == [0.6] * 3  # a perturbation each
    assert {max(plan[s]["proportions"], key=plan[s]["proportions"].get) for s in (1, 2, 3)} == {
        "alpha",
        "beta",
        "gamma",
    }
    assert plan[4]["proportions"] == plan[1]["mixture"]  # step 4 was planned before round 0 was learned
    assert plan[5]["proportions"] == plan[5]["mixture"] != plan[4]["proportions"] and plan[5]["round"] == 0
    run(tmp_path / "ado", {"paradigm": "mix", **ADO}, max_steps=6)
    last = steering_records(tmp_path / "ado" / "steering.jsonl")[-1]
    assert set(last) >= {"preference", "credit", "irreducible_loss", "exponent", "learning_speed"}
    assert last["proportions"] != pytest.approx(dict.fromkeys(("alpha", "beta", "gamma"), 1 / 3))


def held_out_per_domain() -> dict[str, Any]:
    """Four held-out rows of each domain, as eval sets named ``<domain>_eval``."""
    sizes = {"alpha": (4, 0, 0), "beta": (0, 4, 0), "gamma": (0, 0, 4)}
    return {f"{d}_eval": make_dataset(n, seed=5).remove_columns("domain") for d, n in sizes.items()}


def test_aioli_on_held_out_sets_evaluates_each_boundary_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datasteer.mixers.aioli import AioliMixer

    measured: list[int] = []
    held_out = AioliMixer._held_out_losses

    def recording(self: AioliMixer, ctx: Any) -> torch.Tensor:
        measured.append(ctx.step)
        return held_out(self, ctx)

    monkeypatch.setattr(AioliMixer, "_held_out_losses", recording)
    steering = {"paradigm": "mix", **AIOLI, "params": {**AIOLI["params"], "source": "eval"}}
    evals = held_out_per_domain()
    full = run(tmp_path / "full", steering, max_steps=12, save_steps=4, eval_dataset=evals)
    # round r's boundaries: after steps 5r, 5r + 1, 5r + 2, 5r + 3 (the last update follows step 10)
    assert measured == [0, 1, 2, 3, 5, 6, 7, 8, 10]
    part = tmp_path / "part"
    run(part, steering, max_steps=12, save_steps=4, callbacks=[StopAt(6)], eval_dataset=evals)
    resumed = run(part, steering, max_steps=12, save_steps=4, resume=str(part / "checkpoint-4"), eval_dataset=evals)
    records = without_seconds(steering_records(tmp_path / "full" / "steering.jsonl"))
    assert without_seconds(steering_records(part / "steering.jsonl")) == records
    assert records[-1]["round"] == 1.0 and records[-1]["mixture"] != pytest.approx(
        dict.fromkeys(records[-1]["mixture"], 1 / 3)
    )
    full_served = full.served()
    assert {s: full_served[s] for s in range(5, 13)} == resumed.served()


def test_prefetching_workers_get_enough_lag_and_too_little_is_an_error(tmp_path: Path) -> None:
    steering = {"paradigm": "mix", "algorithm": "random", "update_every": 1}
    # Two workers prefetch 2 x 2 micro-batches: the automatic lag covers them ...
    auto = run(tmp_path / "auto", steering, max_steps=5, workers=2)
    reference = run(tmp_path / "ref", {**steering, "lag": 3}, max_steps=5)
    assert auto.served() == reference.served()
    # ... and a lag that is too short is refused rather than silently serving other data.
    with pytest.raises(SteeringStateError, match=r"raise datasteer\.lag"):
        run(tmp_path / "short", {**steering, "lag": 1}, max_steps=5, workers=2)


@dataclasses.dataclass
class _ObservingParams:
    proportions: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.25, 0.25])


@pytest.fixture
def observing_mixer():
    from datasteer.mixers.base import DomainStats, MixContext, Mixer, ObservesSteps
    from datasteer.registry import MIXERS

    seen: list[DomainStats] = []

    @MIXERS.register("_test_observing")
    class ObservingMixer(Mixer, ObservesSteps):
        """Test mixer: fixed proportions, records every step's statistics."""

        Params = _ObservingParams

        def observe(self, stats: DomainStats) -> None:
            seen.append(stats)

        def initial(self, ctx: MixContext) -> torch.Tensor:
            return torch.tensor(self.params.proportions, dtype=torch.float64)

        def update(self, ctx: MixContext) -> torch.Tensor:
            return self.initial(ctx)

    yield "_test_observing", seen
    MIXERS._specs.pop("_test_observing")


def test_mixer_statistics_come_from_the_training_batches_without_changing_training(
    tmp_path: Path, observing_mixer
) -> None:
    name, seen = observing_mixer
    dataset = ragged_dataset()
    observed = run(tmp_path / "obs", {"paradigm": "mix", "algorithm": name}, max_steps=4, dataset=dataset)
    plain = run(
        tmp_path / "plain",
        {"paradigm": "mix", "algorithm": "static", "params": {"proportions": [0.5, 0.25, 0.25]}},
        max_steps=4,
        dataset=dataset,
    )
    # Same stream, and the Trainer's own loss is untouched by the observation.
    assert observed.served() == plain.served()
    assert [m[2] for m in observed.micro] == pytest.approx([m[2] for m in plain.micro], rel=1e-6)
    assert [s.step for s in seen] == [1, 2, 3, 4]
    domains = np.array(dataset["domain"])
    names = ["alpha", "beta", "gamma"]
    for stats in seen:
        counts = Counter(domains[observed.served()[stats.step]].tolist())
        assert stats.samples.tolist() == [counts.get(n, 0) for n in names]
        assert stats.proportions.tolist() == [0.5, 0.25, 0.25]
        tokens = [
            sum(
                sum(t != -100 for t in dataset[i]["labels"][1:])
                for i in observed.served()[stats.step]
                if domains[i] == n
            )
            for n in names
        ]
        assert stats.tokens.tolist() == tokens
        assert torch.isfinite(stats.loss_sum).all() and (stats.loss_sum[stats.samples > 0] > 0).all()
    # Step 1 ran on the initial weights: its loss sums match a direct computation.
    model = make_model().eval()
    rows = observed.served()[1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([dataset[i]["input_ids"] for i in rows])).logits
    labels = torch.tensor([dataset[i]["labels"] for i in rows])
    expected = dict.fromkeys(names, 0.0)
    for b, i in enumerate(rows):
        keep = labels[b, 1:] != -100
        expected[domains[i]] += float(F.cross_entropy(logits[b, :-1][keep], labels[b, 1:][keep]))
    assert seen[0].loss_sum.tolist() == pytest.approx([expected[n] for n in names], rel=1e-5)


@pytest.mark.parametrize("algorithm", ["loss", "delta_loss"])
def test_model_based_selectors_score_the_pool_with_the_live_model(tmp_path: Path, algorithm: str) -> None:
    steering = {"paradigm": "select", "algorithm": algorithm, "warmup_steps": 1, "update_every": 3}
    trainer = run(tmp_path, steering, max_steps=7)
    records = steering_records(tmp_path / "steering.jsonl")
    assert [(r["first_step"], r["last_step"], r["selected"], r["unique"]) for r in records] == [
        (2, 4, 24, 24),
        (5, 7, 24, 24),
    ]
    served = trainer.served()
    for record in records:
        trained = [i for s in range(record["first_step"], record["last_step"] + 1) for i in served[s]]
        assert len(set(trained)) == 24  # the selection, served once each


def test_near_selects_the_domain_of_the_targets(tmp_path: Path) -> None:
    targets = make_dataset(sizes=(0, 0, 6), seed=1).remove_columns("domain")  # 6 rows of domain gamma
    steering = {"paradigm": "select", "algorithm": "near", "warmup_steps": 1, "update_every": 2}
    trainer = run(tmp_path, steering, max_steps=3, eval_dataset=targets)
    (record,) = steering_records(tmp_path / "steering.jsonl")
    # gamma is 16 of the 80 pool rows (20%); nearest to gamma targets, it fills most of the
    # selection even with an untrained model's embeddings (11 of 16 with this seed).
    assert record["domain_counts"]["gamma"] >= 10
    assert record["selected"] == 16 and record["unique"] == 16
    served = [i for s in (2, 3) for i in trainer.served()[s]]
    assert sorted(served) == sorted(set(served))


def test_less_selects_more_of_the_targets_domain(tmp_path: Path) -> None:
    targets = make_dataset(sizes=(0, 0, 6), seed=1).remove_columns("domain")  # 6 rows of domain gamma
    params = {"proj_dim": 2048, "method": "vmap", "adam": True}
    steering = {"paradigm": "select", "algorithm": "less", "warmup_steps": 2, "update_every": 2, "params": params}
    run(tmp_path, steering, max_steps=4, eval_dataset=targets)
    (record,) = steering_records(tmp_path / "steering.jsonl")
    # gamma is 20% of the pool; gradient alignment with gamma targets picks clearly more.
    assert record["selected"] == 16 and record["unique"] == 16
    assert record["domain_counts"]["gamma"] / 16 >= 0.5, record["domain_counts"]


@pytest.mark.parametrize(
    "select",
    [
        {"algorithm": "rho_loss", "update_every": 1, "params": RHO_PARAMS},
        {"algorithm": "greats", "update_every": 1, "params": GREATS_PARAMS},
    ],
    ids=["rho_loss", "greats"],
)
def test_online_selectors_compose_with_a_weighter(
    tmp_path: Path, select: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """select + weight: every step trains exactly the 8 samples its selection kept, each with
    a loss weight; the selections made before training equal those of the selector alone.
    rho_loss's IL model scores pool samples only: no training batch goes through it."""
    import datasteer.integrations.hf as hf

    def no_batch_forward(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a training batch went through the reference model")

    monkeypatch.setattr(hf, "reference_losses", no_batch_forward)
    select = with_reference(select, tmp_path)
    anchors = make_dataset((2, 2, 2), seed=5)
    composed = {"select": select, "weight": {"algorithm": "loss", "params": {"temperature": 0.5}}}
    trainer = run(tmp_path / "both", composed, max_steps=5, eval_dataset=anchors)
    run(tmp_path / "alone", {"paradigm": "select", **select}, max_steps=5, eval_dataset=anchors)
    records = steering_records(tmp_path / "both" / "steering.jsonl")
    selections = [r for r in records if r["paradigm"] == "select"]
    weights = [r for r in records if r["paradigm"] == "weight"]
    assert [(r["first_step"], r["selected"], r["unique"]) for r in selections] == [(s, 8, 8) for s in range(1, 6)]
    assert [r["step"] for r in weights] == [1, 2, 3, 4, 5]
    assert all(r["weight_min"] < r["weight_max"] for r in weights)
    sampler = trainer.steering.sampler  # type: ignore[union-attr]
    for step, indices in trainer.served().items():
        first, plan = sampler.plan_at(step)
        assert first == step and sorted(indices) == sorted(plan.tolist()), step
    solo = steering_records(tmp_path / "alone" / "steering.jsonl")
    assert [r["digest"] for r in selections[:2]] == [r["digest"] for r in solo[:2]]  # decided at train begin


def test_proportions_of_the_wrong_length_fail_when_the_trainer_is_built(tmp_path: Path) -> None:
    from datasteer.errors import ConfigError

    steering = {"paradigm": "mix", "algorithm": "static", "params": {"proportions": [0.5, 0.5]}}
    with pytest.raises(ConfigError, match=r"expected 3 proportions \(one per domain\), got 2"):
        build(tmp_path, steering)


def test_evaluation_loaders_are_built_once_for_all_updates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Model-based updates read the target sets through the Trainer's evaluation loaders once,
    not at every update (accelerate keeps every loader it prepares)."""
    calls: list[object] = []
    original = RecordingTrainer.get_eval_dataloader

    def counting(self, eval_dataset=None):  # type: ignore[no-untyped-def]
        calls.append(eval_dataset)
        return original(self, eval_dataset)

    monkeypatch.setattr(RecordingTrainer, "get_eval_dataloader", counting)
    targets = make_dataset(sizes=(0, 0, 6), seed=1).remove_columns("domain")
    params = {"refresh": True}  # re-embeds pool and targets at every update
    steering = {"paradigm": "select", "algorithm": "near", "warmup_steps": 1, "update_every": 2, "params": params}
    run(tmp_path, steering, max_steps=7, eval_dataset=targets)
    assert len(steering_records(tmp_path / "steering.jsonl")) == 3
    assert len(calls) == 1


def test_uniform_weights_keep_the_trainers_label_smoothing(tmp_path: Path) -> None:
    """The weighted path's loss is the Trainer's own smoothed loss when every weight is 1 (rows of
    equal length, so the per-sample mean is the token mean)."""

    def first_step_losses(out: Path, steering: dict[str, Any] | None) -> list[float]:
        args = training_args(out, per_device_train_batch_size=4, max_steps=1, label_smoothing_factor=0.1)
        trainer = RecordingTrainer(
            model=make_model(),
            args=args,
            train_dataset=make_dataset(),
            data_collator=default_data_collator,
            steering=steering,
        )
        if steering is None:  # record the plain Trainer's micro-batches the same way
            trainer.training_step = lambda model, inputs, n=None: _plain_step(trainer, model, inputs, n)  # type: ignore[method-assign]
        trainer.train()
        return [loss for _, _, loss in trainer.micro]

    plain = first_step_losses(tmp_path / "plain", None)
    weighted = first_step_losses(tmp_path / "weighted", {"paradigm": "weight", "algorithm": "uniform"})
    assert len(plain) == 1 and weighted == pytest.approx(plain, rel=1e-5)


def _plain_step(trainer: RecordingTrainer, model: Any, inputs: dict[str, Any], n: Any) -> torch.Tensor:
    loss = SteeringTrainer.training_step(trainer, model, inputs, n)
    trainer.micro.append((trainer.state.global_step + 1, [], float(loss)))
    return loss


def test_smoothing_changes_the_per_sample_losses() -> None:
    """Guards the test above: with smoothing the per-sample losses differ from plain cross-entropy."""
    from datasteer.ops import per_token_loss

    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    plain, _ = per_token_loss(logits, labels)
    smooth, _ = per_token_loss(logits, labels, 0.1)
    log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -log_p.gather(-1, labels[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(smooth, 0.9 * nll + 0.1 * (-log_p).mean(-1))  # transformers' LabelSmoother
    assert not torch.allclose(plain, smooth)


def test_a_custom_loss_function_is_refused_with_a_weight_stage(tmp_path: Path) -> None:
    from datasteer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^compute_loss_func: weight/uniform weights each sample's loss"):
        build(
            tmp_path,
            {"paradigm": "weight", "algorithm": "uniform"},
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
        )


def test_a_fused_loss_kernel_is_refused_when_per_sample_losses_are_needed(tmp_path: Path) -> None:
    from datasteer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^use_liger_kernel: its fused loss returns no logits, and weight/loss"):
        build(
            tmp_path, {"paradigm": "weight", "algorithm": "loss"}, args=training_args(tmp_path, use_liger_kernel=True)
        )


def test_the_accumulation_rule_is_used_only_on_tested_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from datasteer.integrations.hf import trainer_divides_loss

    class FakeTrainer:
        model_accepts_loss_kwargs = True
        compute_loss_func = None

    assert trainer_divides_loss(FakeTrainer(), None) is True
    assert trainer_divides_loss(FakeTrainer(), 12) is False
    FakeTrainer.model_accepts_loss_kwargs = False
    assert trainer_divides_loss(FakeTrainer(), 12) is True
    monkeypatch.setattr(transformers, "__version__", "5.7.0")
    with pytest.raises(SteeringStateError, match=r"transformers 5\.7\.0: datasteer's weighted loss is tested with"):
        trainer_divides_loss(FakeTrainer(), 12)


class ForwardCounter:
    """Counts the forward passes of a model (a pre-hook on its top module)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        self.count += 1


def test_adapt_makes_no_forward_beyond_the_trainers_own_except_anchor_refreshes(tmp_path: Path) -> None:
    anchors = make_dataset((3, 3, 3), seed=5)  # 9 rows: 2 forwards per refresh at eval batch 8

    def forwards(out: Path, steering: dict[str, Any] | None) -> tuple[int, list[dict[str, Any]]]:
        args = training_args(out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6)
        model = make_model()
        counter = ForwardCounter(model)
        trainer = SteeringTrainer(
            model=model,
            args=args,
            train_dataset=make_dataset(),
            eval_dataset=anchors,
            data_collator=default_data_collator,
            steering=steering,
        )
        trainer.train()
        records = steering_records(out / "steering.jsonl") if steering is not None else []
        return counter.count, records

    plain, _ = forwards(tmp_path / "plain", None)
    steered, records = forwards(
        tmp_path / "adapt", {"paradigm": "weight", "algorithm": "adapt", "params": {"refresh_every": 4}}
    )
    refreshes = [r for r in records if "refresh" in r]
    assert [(r["step"], r["anchors"]) for r in refreshes] == [(0, 9), (4, 9)]  # train begin, step 4
    assert plain == 6 * 2  # one forward per micro-batch
    assert steered == plain + len(refreshes) * 2
    weights = [r for r in records if "weight_mean" in r]
    assert [r["step"] for r in weights] == [1, 2, 3, 4, 5, 6]
    assert all(0 < r["weight_min"] <= r["weight_mean"] <= r["weight_max"] < 1 for r in weights)


@pytest.mark.parametrize(
    "steering",
    [
        {"paradigm": "weight", "algorithm": "uniform"},
        {"mix": {"algorithm": "random", "update_every": 1}, "weight": {"algorithm": "uniform"}},
    ],
    ids=["weight", "mix+weight"],
)
def test_the_trainers_own_log_keeps_every_step_and_carries_the_steering_numbers(
    tmp_path: Path, steering: dict[str, Any]
) -> None:
    trainer = run(tmp_path, steering, bs=4, ga=1, max_steps=4)  # logging_steps=1
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]  # no step loses its loss log
    assert all(entry["steering/weight_mean"] == 1.0 and entry["steering/weight_ess"] == 1.0 for entry in logs)
    if "mix" in steering:
        assert all(abs(sum(entry[f"steering/p_{d}"] for d in ("alpha", "beta", "gamma")) - 1) < 1e-6 for entry in logs)


# -- non-finite losses ------------------------------------------------------------------------


def diverging_run(out: Path, steering: dict[str, Any], max_steps: int = 8, **kwargs: Any) -> RecordingTrainer:
    """The tiny run at learning rate 1e4: its loss is NaN from step 3 on."""
    return run(out, steering, bs=4, ga=1, max_steps=max_steps, learning_rate=1e4, **kwargs)


@pytest.mark.parametrize(
    "steering",
    [{"paradigm": "mix", "algorithm": "static"}, {"paradigm": "mix", "algorithm": "odm"}],
    ids=["trainers-own-loss", "per-sample-losses"],
)
def test_a_diverged_run_stops_with_one_line_after_saving_the_steering_state(
    tmp_path: Path, steering: dict[str, Any]
) -> None:
    with pytest.raises(TrainingDivergedError) as err:
        diverging_run(tmp_path, steering, save_steps=2)
    message = str(err.value)
    assert "\n" not in message
    match = re.search(r"for 3 consecutive steps \((\d+)-(\d+)\); stopped at step (\d+)", message)
    assert match is not None, message
    first, last, stopped = (int(g) for g in match.groups())
    assert last == stopped == first + 2
    assert f"the latest complete checkpoint before it is {tmp_path / f'checkpoint-{(first - 1) // 2 * 2}'}" in message
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["step"] == stopped
    records = read_records(tmp_path / "steering.jsonl")
    assert records[-1] == {**records[-1], "paradigm": "end", "step": stopped}
    assert all(math.isfinite(p) for r in records for p in r.get("proportions", {}).values())


def test_the_stop_can_be_turned_off_and_odm_keeps_its_proportions(tmp_path: Path) -> None:
    """The issue's run: odm exited 0 with a healthy-looking record in which NaN losses had
    become reward 0. It still trains on (max_nonfinite_steps: 0), but no NaN decides anything."""
    trainer = diverging_run(tmp_path, {"paradigm": "mix", "algorithm": "odm", "max_nonfinite_steps": 0}, max_steps=6)
    assert trainer.state.global_step == 6
    records = steering_records(tmp_path / "steering.jsonl")
    updates = [r for r in records if r["update"] >= 0]
    kept = [r for r in updates if r.get("kept")]
    assert kept and all(r["nonfinite"] == 4 for r in kept)  # each kept update followed a step of 4 NaN losses
    assert all(r["proportions"] == kept[0]["proportions"] for r in kept)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1]["steering/mix_nonfinite"] == 4.0


def test_one_non_finite_sample_loss_does_not_turn_the_weighted_loss_nan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasteer.integrations.hf as hf

    real = hf.per_token_loss

    def poisoned(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> Any:
        token_losses, mask = real(logits, labels, smoothing)  # the first sample of each micro-batch overflows
        return torch.cat([torch.full_like(token_losses[:1], float("inf")), token_losses[1:]]), mask

    monkeypatch.setattr(hf, "per_token_loss", poisoned)
    trainer = run(tmp_path, {"paradigm": "weight", "algorithm": "loss"}, bs=4, ga=2, max_steps=3)
    assert all(math.isfinite(loss) for _, _, loss in trainer.micro)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    records = steering_records(tmp_path / "steering.jsonl")
    assert [r["nonfinite"] for r in records] == [2, 2, 2]  # one per micro-batch
    assert all(r["weight_min"] == 0.0 for r in records)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["steering/weight_nonfinite"] for entry in logs] == [2.0, 2.0, 2.0]
