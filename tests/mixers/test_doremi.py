"""DoReMi: the domain-weight update by hand, the weighted objective, and the three-step workflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import default_data_collator

from datasteer.config import load_steering, parse_dataclass
from datasteer.errors import ConfigError
from datasteer.hf import SteeringTrainer
from datasteer.mixers.base import DomainStats
from datasteer.mixers.doremi import DoReMiMixer, DoReMiParams
from datasteer.mixers.static import StaticMixer, StaticParams
from datasteer.ops import INDEX_KEY, per_sample_loss
from tests.factories import make_dataset, make_model, mix_context, steering_records, training_args


def stats(tokens: list[float], excess: list[float], step: int = 1) -> DomainStats:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    k = len(tokens)
    ones = t([1.0] * k)
    return DomainStats(step, ones / k, ones, ones, t(tokens), t(tokens), excess_sum=t(excess))


def hand_update(alpha: list[float], excess: list[float], eta: float, c: float) -> list[float]:
    raised = [a * math.exp(eta * x) for a, x in zip(alpha, excess, strict=True)]
    total = sum(raised)
    return [(1 - c) * r / total + c / len(alpha) for r in raised]


def mixer(eta: float = 1.0, smoothing: float = 0.1) -> DoReMiMixer:
    m = DoReMiMixer(DoReMiParams(reference_model="ref", eta=eta, smoothing=smoothing))
    m.initial(mix_context(k=3))
    return m


def test_three_steps_by_hand_including_a_domain_without_tokens() -> None:
    m = mixer(eta=1.0, smoothing=0.1)
    assert torch.allclose(m.loss_weights(), torch.full((3,), 1 / 3, dtype=torch.float64))
    # step 1: lambda = (5/10, 2/20, 0/0 -> 0); step 2: domain a absent; step 3: clipped excess 0 everywhere
    steps = [([10, 20, 0], [5, 2, 0]), ([0, 8, 4], [0, 4, 1]), ([6, 6, 6], [0, 0, 0])]
    alpha, history = [1 / 3] * 3, []
    for tokens, excess in steps:
        m.observe(stats(tokens, excess))
        lam = [e / n if n else 0.0 for e, n in zip(excess, tokens, strict=True)]
        alpha = hand_update(alpha, lam, 1.0, 0.1)
        history.append(alpha)
        assert torch.allclose(m.loss_weights(), torch.tensor(alpha, dtype=torch.float64), atol=1e-12)
    mean = [sum(h[d] for h in history) / 3 for d in range(3)]
    assert torch.allclose(m.learned_proportions(), torch.tensor(mean, dtype=torch.float64), atol=1e-12)
    assert m.report()["excess_loss"].tolist() == [0.0, 0.0, 0.0]
    # the first step's numbers, written out: lambda = (0.5, 0.1, 0)
    e = [math.exp(0.5), math.exp(0.1), 1.0]
    assert history[0] == pytest.approx([0.9 * v / sum(e) + 0.1 / 3 for v in e], abs=1e-12)


@pytest.mark.parametrize(("smoothing", "expected"), [(1.0, [1 / 3] * 3), (0.0, None)])
def test_smoothing_edge_cases(smoothing: float, expected: list[float] | None) -> None:
    m = mixer(eta=2.0, smoothing=smoothing)
    m.observe(stats([1, 1, 1], [3.0, 0.0, 0.0]))
    got = m.loss_weights()
    if expected is None:  # c = 0: the plain exponentiated-gradient step
        e = [math.exp(6.0), 1.0, 1.0]
        expected = [v / sum(e) for v in e]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_huge_excess_does_not_overflow() -> None:
    m = mixer(eta=1.0, smoothing=0.0)
    m.observe(stats([1, 1, 1], [5000.0, 0.0, 0.0]))
    assert torch.allclose(m.loss_weights(), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_sampling_stays_at_the_reference_proportions() -> None:
    m = DoReMiMixer(DoReMiParams(reference_model="ref", proportions=[0.5, 0.3, 0.2]))
    m.check_domains(("a", "b", "c"))
    m.initial(mix_context(k=3))
    m.observe(stats([1, 1, 1], [1.0, 0.0, 0.0]))
    assert m.update(mix_context(k=3, update=0)).tolist() == [0.5, 0.3, 0.2]


def test_missing_excess_losses_are_an_error_not_a_raw_loss_fallback() -> None:
    m = mixer()
    plain = DomainStats(1, *(torch.ones(3, dtype=torch.float64) for _ in range(5)))
    with pytest.raises(ConfigError, match="no reference model"):
        m.observe(plain)


def test_params_require_a_reference_model() -> None:
    with pytest.raises(ConfigError, match="reference_model"):
        parse_dataclass(DoReMiParams, {}, "datasteer.params")
    with pytest.raises(ConfigError, match="reference_model"):
        DoReMiParams(reference_model=" ")
    with pytest.raises(ConfigError, match="smoothing"):
        DoReMiParams(reference_model="r", smoothing=1.5)


def test_state_round_trip_continues_the_same_weights() -> None:
    a = mixer()
    a.observe(stats([10, 20, 5], [5, 2, 1]))
    b = DoReMiMixer(a.params)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.observe(stats([4, 4, 4], [1, 3, 0]))
    assert torch.equal(a.loss_weights(), b.loss_weights())
    assert torch.equal(a.learned_proportions(), b.learned_proportions())


# -- the proxy's objective through the Trainer ----------------------------------------------------


def save_reference(folder: Path) -> str:
    make_model(seed=1).save_pretrained(folder)
    return str(folder)


def proxy_trainer(out: Path, reference: str, max_steps: int = 4, save_steps: int = 1000) -> SteeringTrainer:
    args = training_args(out, per_device_train_batch_size=8, max_steps=max_steps, save_steps=save_steps)
    steering = {"paradigm": "mix", "algorithm": "doremi", "update_every": 2, "params": {"reference_model": reference}}
    return SteeringTrainer(
        model=make_model(),
        args=args,
        train_dataset=make_dataset(),
        data_collator=default_data_collator,
        steering=steering,
    )


def test_weighted_loss_gradient_is_the_alpha_weighted_sum_of_domain_gradients(tmp_path: Path) -> None:
    trainer = proxy_trainer(tmp_path / "run", save_reference(tmp_path / "ref"))
    loader = trainer.get_train_dataloader()
    ctl = trainer.steering
    assert ctl is not None
    ctl.begin(max_steps=4)
    alpha = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    mixer = ctl.plan.mixer
    assert isinstance(mixer, DoReMiMixer)
    mixer.alpha = alpha.clone()
    batch = next(iter(loader))
    domains = torch.from_numpy(ctl.domains[batch[INDEX_KEY].numpy()])
    assert len(domains.unique()) >= 2
    model = trainer.model
    model.train()

    model.zero_grad()
    trainer.compute_loss(model, dict(batch)).backward()
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k not in (INDEX_KEY, "labels")}
    losses, _ = per_sample_loss(model(**inputs).logits, batch["labels"])
    objective = sum(alpha[d] * losses[domains == d].mean() for d in domains.unique().tolist())
    torch.autograd.backward(objective)
    expected = [p.grad.clone() for p in model.parameters()]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e.to(g.dtype), rtol=1e-5, atol=1e-7)


def test_proxy_run_writes_weights_that_a_static_run_reads(tmp_path: Path) -> None:
    trainer = proxy_trainer(tmp_path / "proxy", save_reference(tmp_path / "ref"), max_steps=6)
    trainer.train()
    records = steering_records(tmp_path / "proxy" / "steering.jsonl")
    assert [r["update"] for r in records] == [0, 1, 2]
    assert all(set(r["alpha"]) == {"alpha", "beta", "gamma"} for r in records)
    assert all(v == pytest.approx(1 / 3) for r in records for v in r["proportions"].values())
    weights = json.loads((tmp_path / "proxy" / "domain_weights.json").read_text())
    assert trainer.steering is not None
    mixer = trainer.steering.plan.mixer
    assert isinstance(mixer, DoReMiMixer)
    assert weights["domains"] == ["alpha", "beta", "gamma"] and weights["step"] == 6
    assert weights["proportions"] == pytest.approx(mixer.learned_proportions().tolist(), abs=1e-12)
    assert weights["proportions"] != pytest.approx([1 / 3] * 3)  # the excess losses moved them

    weights_file = str(tmp_path / "proxy" / "domain_weights.json")
    config = load_steering({"paradigm": "mix", "algorithm": "static", "params": {"proportions_file": weights_file}})
    static = StaticMixer(config.stages["mix"].params)
    static.check_domains(("gamma", "alpha", "beta"))  # matched by name, in this run's order
    got = static.initial(mix_context(names=("gamma", "alpha", "beta"))).tolist()
    assert got == pytest.approx([weights["proportions"][2], weights["proportions"][0], weights["proportions"][1]])


def test_static_proportions_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        StaticMixer(StaticParams(proportions_file=str(tmp_path / "nope.json"))).check_domains(("a",))
    bad = tmp_path / "w.json"
    bad.write_text(json.dumps({"domains": ["a", "b"], "proportions": [0.5, 0.5]}))
    with pytest.raises(ConfigError, match="has weights for domains"):
        StaticMixer(StaticParams(proportions_file=str(bad))).check_domains(("a", "c"))
    with pytest.raises(ConfigError, match="not both"):
        StaticParams(proportions=[1.0], proportions_file=str(bad))


def test_missing_reference_model_fails_when_the_trainer_is_built(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no saved model"):
        proxy_trainer(tmp_path / "run", str(tmp_path / "missing"))


def test_resumed_proxy_run_continues_the_same_weights(tmp_path: Path) -> None:
    reference = save_reference(tmp_path / "ref")
    proxy_trainer(tmp_path / "full", reference, max_steps=6, save_steps=3).train()
    part = proxy_trainer(tmp_path / "part", reference, max_steps=6, save_steps=3)
    part.train()
    resumed = proxy_trainer(tmp_path / "part", reference, max_steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    full = json.loads((tmp_path / "full" / "domain_weights.json").read_text())
    again = json.loads((tmp_path / "part" / "domain_weights.json").read_text())
    assert again["proportions"] == pytest.approx(full["proportions"], abs=1e-9)


def test_a_step_whose_weights_would_not_be_finite_leaves_alpha_as_it_was(caplog: pytest.LogCaptureFixture) -> None:
    m = mixer(eta=2.0, smoothing=0.1)
    m.observe(stats([10, 20, 5], [5, 2, 1]))
    alpha = m.loss_weights()
    # an excess sum that overflowed, then a finite lambda whose eta * lambda is not
    m.observe(stats([10, 20, 5], [math.inf, 2, 1], step=2))
    m.observe(stats([1, 1, 1], [1e308, 0.0, 0.0], step=3))
    assert torch.equal(m.loss_weights(), alpha) and m.steps_observed == 1
    assert torch.equal(m.learned_proportions(), alpha)
    assert caplog.text.count("give no finite domain weights") == 2


def test_a_diverged_proxy_with_the_stop_turned_off_still_writes_finite_weights(tmp_path: Path) -> None:
    """The issue's run: at learning rate 1e4 alpha turned NaN from step 3 and the run ended with
    'doremi returned invalid proportions', writing neither model nor domain_weights.json."""
    args = training_args(tmp_path / "proxy", per_device_train_batch_size=4, max_steps=5, learning_rate=1e4)
    steering = {
        "paradigm": "mix",
        "algorithm": "doremi",
        "max_nonfinite_steps": 0,
        "params": {"reference_model": save_reference(tmp_path / "ref")},
    }
    trainer = SteeringTrainer(
        model=make_model(),
        args=args,
        train_dataset=make_dataset(),
        data_collator=default_data_collator,
        steering=steering,
    )
    trainer.train()
    records = steering_records(tmp_path / "proxy" / "steering.jsonl")
    assert sum(r.get("nonfinite", 0) for r in records) > 0  # the model did diverge
    assert all(math.isfinite(v) for r in records for v in r["alpha"].values())
    weights = json.loads((tmp_path / "proxy" / "domain_weights.json").read_text())
    assert all(math.isfinite(p) for p in weights["proportions"]) and sum(weights["proportions"]) == pytest.approx(1)
