"""Dynamic MoE mixing: the update rule by hand for 3 domains, held-out sources, state, freezing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import default_data_collator

from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError
from datasteer.hf import SteeringTrainer
from datasteer.mixers.dynamic_moe import DynamicMoEMixer, DynamicMoEParams, load_distances, update_weights
from tests.factories import make_dataset, make_moe_model, make_streams, mix_context, steering_records, training_args
from tests.fakes import FakeOps

R2 = math.sqrt(2.0)
#: Normalised loads (K=3 domains, 1 layer, 2 experts) seen at updates 0, 1, 2, and the
#: Delta_d = (1/3) sum_j ||O_d - O_j|| they give, worked out by hand.
LOADS = (
    [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],  # d01 = sqrt 2, d02 = d12 = sqrt(1/2)
    [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]],  # all equal
    [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],  # d01 = 0, d02 = d12 = sqrt 2
)
DELTAS = ([R2 / 2, R2 / 2, R2 / 3], [0.0, 0.0, 0.0], [R2 / 3, R2 / 3, 2 * R2 / 3])


def by_hand(w: list[float], delta: list[float], eta: float, c: float) -> list[float]:
    e = [wi * math.exp(eta * di) for wi, di in zip(w, delta, strict=True)]
    return [(1 - c) * x / sum(e) + c / len(w) for x in e]


#: Held-out rows of each domain (an evaluation set named like the domain).
EVAL_SIZES = {"alpha": (3, 0, 0), "beta": (0, 3, 0), "gamma": (0, 0, 3)}
#: Domain ids of the 15 pool rows (6, 5 and 4 rows).
DOMAINS = torch.repeat_interleave(torch.arange(3), torch.tensor([6, 5, 4]))


def loads(domains: torch.Tensor, updates: range) -> list[torch.Tensor]:
    """Expert loads of rows of these domains at each update: ``10 * LOADS[update][d]`` counts
    for every row of domain d, one layer: ``(rows, 1, 2)`` each."""
    return [(torch.tensor(LOADS[u]) * 10)[domains].unsqueeze(1) for u in updates]


def fake_ops(updates: range = range(3), *, evals: bool = False) -> FakeOps:
    """The pool (DOMAINS), and with ``evals`` an 8-row eval set named after each domain."""
    targets = [FakeOps(expert_loads=loads(torch.full((8,), d), updates), name=f"d{d}_eval") for d in range(3)]
    return FakeOps(expert_loads=loads(DOMAINS, updates), targets=targets if evals else [])


def rows_asked(ops: FakeOps) -> list[list[int]]:
    return [call.indices for call in ops.calls]


def run(
    params: dict, updates: int = 3, *, seed: int = 0, evals: bool = False
) -> tuple[DynamicMoEMixer, list[list[float]], FakeOps]:
    mixer = DynamicMoEMixer(parse_dataclass(DynamicMoEParams, params, "datasteer.params"))
    ops = fake_ops(range(updates), evals=evals)
    out = []
    for u in range(updates):
        ctx = mix_context(k=3, update=u, seed=seed, sizes=(6, 5, 4), domains=DOMAINS, ops=ops)
        out.append(mixer.update(ctx).tolist())
    return mixer, out, ops


@pytest.mark.parametrize(("eta", "c"), [(1.0, 0.1), (10.0, 0.0), (10.0, 1.0), (10.0, 0.05)])
def test_three_updates_match_hand_computation(eta: float, c: float) -> None:
    mixer, props, _ = run({"eta": eta, "smoothing": c, "freeze_router": False})
    w = [1 / 3] * 3
    for u in range(3):
        w = by_hand(w, DELTAS[u], eta, c)
        assert props[u] == pytest.approx(w, abs=1e-12)
        assert sum(props[u]) == pytest.approx(1.0, abs=1e-12)
        assert mixer.history[u]["delta"] == pytest.approx(DELTAS[u], abs=1e-12)


def test_hand_values_and_smoothing_edges() -> None:
    _, a, _ = run({"eta": 1.0, "smoothing": 0.1, "freeze_router": False})
    assert a[0] == pytest.approx([0.3559121450065657, 0.3559121450065657, 0.2881757099868685], abs=1e-12)
    assert a[1] == pytest.approx([0.35365426383924253, 0.35365426383924253, 0.292691472321515], abs=1e-12)
    assert a[2] == pytest.approx([0.3039246613923636, 0.3039246613923636, 0.3921506772152727], abs=1e-12)
    # c = 0: no smoothing, the all-equal update leaves w exactly as it was.
    _, b, _ = run({"eta": 10.0, "smoothing": 0.0, "freeze_router": False})
    assert b[0] == pytest.approx([0.477394928016378, 0.477394928016378, 0.045210143967244015], abs=1e-12)
    assert b[1] == pytest.approx(b[0], abs=1e-15)
    assert b[2] == pytest.approx([0.07962122658431209, 0.07962122658431209, 0.8407575468313758], abs=1e-12)
    # c = 1: always uniform, whatever the loads.
    _, u, _ = run({"eta": 10.0, "smoothing": 1.0, "freeze_router": False})
    assert u == [[1 / 3] * 3] * 3


def test_update_helpers() -> None:
    loads = torch.tensor(LOADS[0], dtype=torch.float64)
    assert load_distances(loads).tolist() == pytest.approx(DELTAS[0], abs=1e-15)
    # Huge eta with c = 0 drives a weight to exactly 0; the next update stays finite.
    w = update_weights(torch.full((3,), 1 / 3, dtype=torch.float64), torch.tensor([0.0, 0.0, 1.0]), 1e4, 0.0)
    assert w.tolist() == [0.0, 0.0, 1.0]
    w = update_weights(w, torch.tensor([1.0, 0.0, 0.0]), 1.0, 0.0)
    assert w.tolist() == [0.0, 0.0, 1.0] and torch.isfinite(w).all()


def test_without_eval_sets_samples_pool_rows_once_and_deterministically() -> None:
    mixer, props, ops = run({"samples_per_domain": 3, "freeze_router": False}, seed=5)
    assert mixer.source_used == "pool"
    asked = rows_asked(ops)
    assert len(asked) == 3 and asked[0] == asked[1] == asked[2]  # the same rows every update
    rows = torch.tensor(asked[0])
    assert torch.bincount(DOMAINS[rows]).tolist() == [3, 3, 3] and len(set(rows.tolist())) == 9
    _, props2, ops2 = run({"samples_per_domain": 3, "freeze_router": False}, seed=5)
    assert rows_asked(ops2)[0] == asked[0] and props2 == props
    other = run({"samples_per_domain": 3, "freeze_router": False}, seed=6)[2]
    assert rows_asked(other)[0] != asked[0]
    # More rows asked for than a domain has: all of that domain's rows.
    big = run({"samples_per_domain": 100, "freeze_router": False}, updates=1)[2]
    assert sorted(rows_asked(big)[0]) == list(range(15))


def test_eval_sets_named_like_the_domains_are_used() -> None:
    mixer, props, ops = run({"samples_per_domain": 5, "freeze_router": False}, evals=True)
    assert mixer.source_used == "eval"
    assert ops.calls == []  # the pool is not measured
    assert [rows_asked(t) for t in ops.targets] == [[[0, 1, 2, 3, 4]] * 3] * 3  # the first 5 rows of each eval set
    w = [1 / 3] * 3
    for u in range(3):
        w = by_hand(w, DELTAS[u], 10.0, 0.05)
        assert props[u] == pytest.approx(w, abs=1e-12)
    # source: pool ignores them; source: eval without them is an error naming the key.
    assert run({"source": "pool", "freeze_router": False}, updates=1, evals=True)[0].source_used == "pool"
    with pytest.raises(ConfigError, match="source"):
        run({"source": "eval", "freeze_router": False}, updates=1)


def test_state_round_trip_continues_exactly() -> None:
    full, expected, _ = run({"eta": 3.0, "freeze_router": False})
    first, _, _ = run({"eta": 3.0, "freeze_router": False}, updates=1)
    resumed = DynamicMoEMixer(parse_dataclass(DynamicMoEParams, {"eta": 3.0}, "datasteer.params"))
    resumed.load_state_dict(first.state_dict())
    ops = fake_ops(range(1, 3))
    for u in (1, 2):
        ctx = mix_context(k=3, update=u, sizes=(6, 5, 4), domains=DOMAINS, ops=ops)
        assert resumed.update(ctx).tolist() == expected[u]
    assert rows_asked(ops)[0] == first.held_out.tolist()
    state = resumed.state_dict()
    assert set(state) == {"weights", "held_out", "source_used", "last_loads", "last_delta", "history"}
    assert [h["update"] for h in state["history"]] == [0, 1, 2]
    assert torch.equal(state["weights"], full.weights)


def test_report_layers_and_params() -> None:
    mixer, _, _ = run({"freeze_router": False}, updates=1)
    report = mixer.report()
    assert report["delta"].tolist() == pytest.approx(DELTAS[0])
    assert report["expert_loads"].tolist() == LOADS[0]
    assert DynamicMoEMixer(DynamicMoEParams()).report() == {}
    with pytest.raises(ConfigError, match="layer"):
        run({"layer": 1, "freeze_router": False}, updates=1)  # the fake model has one MoE layer
    for bad in ({"eta": -1.0}, {"smoothing": 1.5}, {"samples_per_domain": 0}, {"top_k": 0}, {"router_names": []}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            parse_dataclass(DynamicMoEParams, bad, "datasteer.params")


def test_all_layers_representation_sums_to_one() -> None:
    (one,) = loads(DOMAINS, range(1))
    two_layers = FakeOps(expert_loads=torch.cat([one, one.flip(-1)], dim=1))  # layer 1 mirrors layer 0
    mixer = DynamicMoEMixer(DynamicMoEParams(layer=None, freeze_router=False))
    mixer.update(mix_context(k=3, sizes=(6, 5, 4), domains=DOMAINS, ops=two_layers))
    assert mixer.last_loads is not None and mixer.last_loads.shape == (3, 2, 2)
    assert mixer.last_loads.sum(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0, 1.0])
    # Both layers differ by the same distances, halved and concatenated: Delta = the 1-layer Delta / sqrt(2).
    assert mixer.last_delta is not None
    assert mixer.last_delta.tolist() == pytest.approx([d / R2 for d in DELTAS[0]])


def test_prepare_model_freezes_exactly_the_routers() -> None:
    model = make_moe_model()
    DynamicMoEMixer(DynamicMoEParams(freeze_router=False)).prepare_model(model)
    assert all(p.requires_grad for p in model.parameters())
    DynamicMoEMixer(DynamicMoEParams()).prepare_model(model)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["model.layers.0.mlp.gate.weight", "model.layers.2.mlp.gate.weight"]


def test_trains_a_tiny_moe_with_frozen_routers(tmp_path: Path) -> None:
    """Through the HF Trainer: routers stay fixed while the rest trains; every update's
    proportions are recorded and equal the mixer's weights."""
    model = make_moe_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp_path, per_device_train_batch_size=4, max_steps=6, save_strategy="no")
    steering = {
        "paradigm": "mix",
        "algorithm": "dynamic_moe",
        "warmup_steps": 2,
        "update_every": 2,
        "params": {"samples_per_domain": 4, "eta": 10.0},
    }
    trainer = SteeringTrainer(
        model=model, args=args, train_dataset=make_dataset(), data_collator=default_data_collator, steering=steering
    )
    trainer.train()
    after = dict(model.named_parameters())
    assert torch.equal(after["model.layers.0.mlp.gate.weight"], before["model.layers.0.mlp.gate.weight"])
    assert torch.equal(after["model.layers.2.mlp.gate.weight"], before["model.layers.2.mlp.gate.weight"])
    assert not torch.equal(
        after["model.layers.0.mlp.shared_expert.gate_proj.weight"],
        before["model.layers.0.mlp.shared_expert.gate_proj.weight"],
    )
    records = [r for r in steering_records(tmp_path / "steering.jsonl") if r["update"] >= 0]
    assert [r["first_step"] for r in records] == [3, 5]
    mixer = trainer.steering.plan.mixer
    assert isinstance(mixer, DynamicMoEMixer) and mixer.source_used == "pool"
    assert list(records[-1]["proportions"].values()) == pytest.approx(mixer.weights.tolist(), abs=1e-8)
    assert [h["update"] for h in mixer.history] == [0, 1]
    assert len({tuple(r["proportions"].values()) for r in records}) == 2


def test_mixes_streamed_domains_from_an_evaluation_set_per_domain(tmp_path: Path) -> None:
    """Streams hold no pool rows to measure: with source eval the expert loads come from
    the per-domain evaluation sets, and the mixture moves; other sources are refused."""
    streaming = {"paradigm": "mix", "algorithm": "dynamic_moe", "warmup_steps": 2, "update_every": 2}
    evals = {d: make_dataset(n, seed=1).remove_columns("domain") for d, n in EVAL_SIZES.items()}
    args = training_args(tmp_path, per_device_train_batch_size=4, max_steps=6, save_strategy="no")
    common = {"args": args, "data_collator": default_data_collator, "eval_dataset": evals}
    with pytest.raises(ConfigError, match="set source: eval"):
        SteeringTrainer(
            model=make_moe_model(), train_dataset=make_streams(tmp_path / "s0"), steering=streaming, **common
        )
    steering = {**streaming, "params": {"source": "eval", "samples_per_domain": 3}}
    trainer = SteeringTrainer(
        model=make_moe_model(), train_dataset=make_streams(tmp_path / "s"), steering=steering, **common
    )
    trainer.train()
    mixer = trainer.steering.plan.mixer
    assert isinstance(mixer, DynamicMoEMixer) and mixer.source_used == "eval"
    records = [r for r in steering_records(tmp_path / "steering.jsonl") if r["update"] >= 0]
    assert [r["first_step"] for r in records] == [3, 5]
    assert len({tuple(r["proportions"].values()) for r in records}) == 2


@pytest.mark.slow
def test_example_through_llamafactory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped example on builtin:tiny-moe: per-domain eval sets are used, every update
    is recorded with its Delta, and the saved model's routers are the initial ones."""
    pytest.importorskip("llamafactory")
    from safetensors.torch import load_file

    from datasteer.assets import ensure_builtin
    from datasteer.cli import main

    monkeypatch.setenv("DATASTEER_HOME", str(tmp_path / "home"))
    example = Path(__file__).resolve().parents[2] / "examples" / "mix_dynamic_moe.yaml"
    quick = ["max_steps=6", "save_steps=100", "per_device_train_batch_size=4", "datasteer.warmup_steps=2"]
    quick += ["datasteer.update_every=2", "datasteer.params.samples_per_domain=8"]
    assert main(["train", str(example), f"output_dir={tmp_path / 'out'}", *quick]) == 0
    records = [r for r in steering_records(tmp_path / "out" / "steering.jsonl") if r["update"] >= 0]
    assert [r["first_step"] for r in records] == [3, 5]
    assert all(set(r["delta"]) == {"prose_sft", "code_sft", "arithmetic_sft", "noise_sft"} for r in records)
    assert all(len(r["expert_loads"]) == 4 for r in records)
    assert records[-1]["proportions"] != records[0]["proportions"]
    initial = load_file(str(ensure_builtin("tiny-moe") / "model.safetensors"))
    trained = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in initial:
        same = torch.equal(initial[name], trained[name])
        assert same == name.endswith("mlp.gate.weight"), name  # only the routers stayed fixed
