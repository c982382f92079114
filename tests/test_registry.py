"""Contract tests over every registered algorithm, and the registry's own rules."""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from datasteer.algorithm import Algorithm
from datasteer.config import PARADIGMS, load_steering, parse_dataclass, read_yaml
from datasteer.errors import ConfigError
from datasteer.mixers.ado import ADOMixer
from datasteer.mixers.aioli import AioliMixer
from datasteer.mixers.base import DomainStats, Mixer
from datasteer.mixers.doremi import DoReMiMixer
from datasteer.mixers.dynamic_moe import DynamicMoEMixer
from datasteer.mixers.odm import ODMMixer
from datasteer.ops.prepared import embedding_settings, pool_fingerprint, row_token_ids, write_prepared
from datasteer.plugins import Plugin, unwrap
from datasteer.registry import AlgorithmSpec, Registry, registry_for
from datasteer.selectors.base import Selector
from datasteer.selectors.cluster_less import ClusterLessSelector
from datasteer.selectors.delta_loss import DeltaLossSelector
from datasteer.selectors.greats import GreatsSelector
from datasteer.selectors.near import NearSelector
from datasteer.selectors.rho_loss import RhoLossSelector
from datasteer.selectors.tsds import TsdsParams, TsdsSelector
from datasteer.weighters.adapt import AdaptWeighter
from datasteer.weighters.base import Weighter
from tests.factories import make_model, mix_context, select_context, weight_context
from tests.fakes import FakeOps, live_optimizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: Smallest valid params of algorithms that have required parameters.
MINIMAL_PARAMS: dict[tuple[str, str], dict[str, Any]] = {
    ("mix", "scheduled"): {"schedule": [[0, [1.0]]]},
    ("mix", "doremi"): {"reference_model": "outputs/doremi/reference"},
    ("select", "tsds"): {"prepared": "outputs/prepared/tsds"},
    ("select", "custom"): {"path": "datasteer.selectors.random:RandomSelector"},
    ("weight", "custom"): {"path": "datasteer.weighters.uniform:UniformWeighter"},
    ("weight", "reducible"): {"reference_model": "outputs/doremi/reference"},
    ("select", "rho_loss"): {"reference_model": "outputs/rho_loss/irreducible"},
}

BASES = {"select": Selector, "mix": Mixer, "weight": Weighter}

SPECS = [spec for paradigm in PARADIGMS for spec in registry_for(paradigm)]


def spec_id(spec: AlgorithmSpec) -> str:
    return f"{spec.paradigm}-{spec.name}"


def build(spec: AlgorithmSpec) -> Algorithm:
    return build_from(spec, MINIMAL_PARAMS.get((spec.paradigm, spec.name)))


def build_from(spec: AlgorithmSpec, data: dict[str, Any] | None) -> Algorithm:
    params: Any = parse_dataclass(spec.params_cls, data, "datasteer.params")
    algorithm: Algorithm = registry_for(spec.paradigm).build(spec.name, params)
    return algorithm


def same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def keeps_state(algorithm: Algorithm) -> bool:
    """Whether the algorithm keeps state: its class (for a ``custom`` algorithm, which
    delegates, the user's class) overrides ``state_dict``."""
    return type(unwrap(algorithm)).state_dict is not Algorithm.state_dict


def test_every_paradigm_has_algorithms() -> None:
    assert {spec.paradigm for spec in SPECS} == set(PARADIGMS)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_spec_matches_its_paradigm(spec: AlgorithmSpec) -> None:
    assert issubclass(spec.cls, BASES[spec.paradigm])
    assert spec.params_cls is spec.cls.Params
    assert registry_for(spec.paradigm).get(spec.name) is spec


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_params_fields_are_documented_and_defaulted(spec: AlgorithmSpec) -> None:
    assert dataclasses.is_dataclass(spec.params_cls)
    required = set(MINIMAL_PARAMS.get((spec.paradigm, spec.name), {}))
    for f in dataclasses.fields(spec.params_cls):
        assert f.metadata.get("help", "").strip(), f"{spec_id(spec)}.{f.name} has no help text (use config.doc)"
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        assert has_default or f.name in required, f"{spec_id(spec)}.{f.name} has no default"


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_class_docstring_has_a_summary_line(spec: AlgorithmSpec) -> None:
    assert spec.summary
    assert spec.summary == (spec.cls.__doc__ or "").strip().splitlines()[0]
    assert spec.summary.endswith("."), f"{spec.name}: the summary line must be a whole sentence"


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_builds_with_default_params(spec: AlgorithmSpec) -> None:
    algorithm = build(spec)
    assert isinstance(algorithm, spec.cls)
    assert isinstance(algorithm.params, spec.params_cls)


#: Selectors run on streamed domains by a test (tests/test_stream_windows.py and
#: tests/integrations/test_streamed_training.py); every other selector must refuse streams.
STREAMED_SELECTORS = {"random", "loss", "less", "greats", "near", "nice", "rho_loss", "custom"}


@pytest.mark.parametrize("spec", [s for s in SPECS if s.paradigm == "select"], ids=spec_id)
def test_every_selector_refuses_streams_or_is_tested_on_them(spec: AlgorithmSpec) -> None:
    selector = build(spec)
    assert isinstance(selector, Selector)
    if spec.name in STREAMED_SELECTORS:
        selector.check_streams()
        assert selector.window_ratio() >= 1
    else:
        with pytest.raises(ConfigError, match=f"{spec.name} cannot choose from streamed domains"):
            selector.check_streams()


def through_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` saved and read back as a checkpoint does (``torch.save``, ``weights_only`` load)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_fresh_state_round_trip(spec: AlgorithmSpec) -> None:
    """A checkpoint saved before the first update restores (stateless algorithms: nothing)."""
    state = through_checkpoint(build(spec).state_dict())
    fresh = build(spec)
    fresh.load_state_dict(state)
    assert same_state(fresh.state_dict(), state)
    assert keeps_state(fresh) or state == {}


def test_build_rejects_params_of_another_algorithm() -> None:
    with pytest.raises(TypeError, match="expected params of type"):
        registry_for("mix").build("static", registry_for("mix").get("random").params_cls())


def test_stateless_algorithm_rejects_foreign_state() -> None:
    algorithm = build(registry_for("weight").get("uniform"))
    with pytest.raises(ValueError, match="keeps no state"):
        algorithm.load_state_dict({"ema": torch.zeros(2)})


# -- state round trip after real updates ------------------------------------------------------
#
# A fresh instance's state is empty, so round-tripping it proves little. Each stateful
# algorithm (see keeps_state) is driven through real updates with hand-made contexts and
# FakeOps answers, checkpointed, restored into a fresh instance, and both make the next
# update; the select and weight ones also inside their paradigm's custom wrapper.


@dataclass(frozen=True)
class Exercise:
    """How to drive a stateful algorithm without a model.

    Attributes:
        update: makes update ``u`` (0, 1, 2) of the algorithm (as the drivers run it: a custom
            algorithm's user instance) with hand-made contexts and FakeOps answers, and
            returns what it produced (selection, proportions, weights); the same ``u`` gives
            the same contexts and answers every time.
        params: the params to build it with, given a scratch folder; default MINIMAL_PARAMS.
    """

    update: Callable[[Any, int], Any]
    params: Callable[[Path], dict[str, Any]] | None = None


def given(**params: Any) -> Callable[[Path], dict[str, Any]]:
    """Exercise params that need no scratch folder."""
    return lambda _folder: params


def _t(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


#: Per update: samples and summed losses of the K = 3 domains in one step (domain 1 absent at update 1).
ODM_STEPS = (([2, 1, 1], [5.0, 2.0, 1.5]), ([3, 0, 1], [6.6, 0.0, 0.8]), ([1, 1, 2], [2.2, 1.9, 3.0]))


def exercise_odm(mixer: ODMMixer, u: int) -> torch.Tensor:
    samples, loss_sum = (_t(v) for v in ODM_STEPS[u])
    mixer.observe(DomainStats(u + 1, _t([1 / 3] * 3), samples, loss_sum, samples * 10, loss_sum * 10))
    # The run's updates 3 to 5: until t > K ln K (t = update + 1) EXP3 explores uniformly,
    # whatever the estimates, and the proportions would not show a lost state.
    return mixer.update(mix_context(k=3, update=u + 3))


#: Per update: the step's excess loss summed over each domain's tokens (10, 20, 5 tokens).
DOREMI_EXCESS = ([1.0, 4.0, 0.5], [0.0, 2.0, 3.0], [2.5, 0.0, 0.0])


def exercise_doremi(mixer: DoReMiMixer, u: int) -> tuple[torch.Tensor, ...]:
    tokens = _t([10, 20, 5])
    stats = DomainStats(u + 1, _t([1 / 3] * 3), _t([1, 1, 1]), tokens, tokens, tokens, excess_sum=_t(DOREMI_EXCESS[u]))
    mixer.observe(stats)
    learned = mixer.learned_proportions()
    assert learned is not None
    return mixer.update(mix_context(k=3, update=u)), mixer.loss_weights(), learned


def step_stats(step: int, samples: Sequence[float], losses: Sequence[float]) -> DomainStats:
    """One trained step: ``samples`` of each domain with mean loss ``losses``."""
    n, loss = _t(samples), _t(losses)
    return DomainStats(step, n / n.sum(), n, n * loss, n * 10, n * loss * 10)


#: Per step of the exercises below: samples and mean loss of the K = 3 domains (domain 2 absent at step 5).
LEARNING_STEPS = [
    ([4, 2, 2], [5.0, 6.0, 4.0]),
    ([2, 4, 2], [4.6, 5.5, 3.9]),
    ([2, 2, 4], [4.4, 5.2, 3.5]),
    ([3, 3, 2], [4.3, 5.0, 3.3]),
    ([4, 4, 0], [4.1, 4.9, 0.0]),
    ([4, 2, 2], [3.9, 4.8, 3.0]),
    ([2, 4, 2], [3.8, 4.6, 2.9]),
    ([2, 2, 4], [3.7, 4.5, 2.7]),
    ([3, 3, 2], [3.6, 4.4, 2.6]),
]


def exercise_aioli(mixer: AioliMixer, u: int) -> torch.Tensor:
    # Rounds of 5 steps, LearnParams on steps 1-3 (one sweep of 1-step intervals): update 0 learns
    # round 0 and moves p, update 1 plans round 1, update 2 observes its LearnParams steps.
    if u == 0:
        mixer.update(mix_context(k=3, first_step=1, last_step=1))
    for step in range(3 * u + 1, 3 * u + 4):
        mixer.observe(step_stats(step, *LEARNING_STEPS[step - 1]))
    first = 3 * u + 4
    return mixer.update(mix_context(k=3, step=first - 1, first_step=first, last_step=first, update=u + 1))


def exercise_ado(mixer: ADOMixer, u: int) -> torch.Tensor:
    # Three observed steps per update; every update refits the laws (fit_every 2).
    for step in range(3 * u + 1, 3 * u + 4):
        mixer.observe(step_stats(step, *LEARNING_STEPS[step - 1]))
    first = 3 * u + 4
    return mixer.update(mix_context(k=3, step=first - 1, first_step=first, last_step=first, update=u))


MOE_DOMAINS = torch.repeat_interleave(torch.arange(3), torch.tensor([6, 5, 4]))


def exercise_dynamic_moe(mixer: DynamicMoEMixer, u: int) -> torch.Tensor:
    # Loads (15 rows, 1 layer, 2 experts) that differ by row, so which held-out rows were
    # drawn (part of the state) changes the result.
    rows = torch.arange(15.0)
    loads = torch.stack([rows % (u + 2) + 1, (MOE_DOMAINS + 1.0) * (u + 1)], dim=1).unsqueeze(1)
    ctx = mix_context(k=3, update=u, sizes=(6, 5, 4), domains=MOE_DOMAINS, ops=FakeOps(expert_loads=loads))
    return mixer.update(ctx)


#: Per update: the loss of each of 8 pool samples.
DELTA_LOSSES = (
    [3.0, 2.5, 4.0, 1.0, 2.0, 3.5, 5.0, 1.5],
    [2.0, 2.4, 1.0, 1.2, 1.0, 3.0, 2.0, 1.4],
    [1.5, 2.3, 0.8, 1.1, 0.9, 2.0, 1.0, 1.6],
)


def exercise_delta_loss(selector: DeltaLossSelector, u: int) -> torch.Tensor:
    ops = FakeOps(losses=torch.tensor(DELTA_LOSSES[u]))
    return selector.select(select_context(num_samples=4, update=u, total_updates=4, ops=ops))


#: The irreducible losses of 8 pool samples (fixed: the IL model does not train).
RHO_IRREDUCIBLE = [0.5, 2.4, 0.1, 1.0, 0.2, 3.0, 0.4, 1.2]


def exercise_rho_loss(selector: RhoLossSelector, u: int) -> torch.Tensor:
    # 4 candidates per update from a pool of 8: update 2 starts a second pass over the pool,
    # whose order (and the irreducible losses already known) live in the state.
    ops = FakeOps(losses=torch.tensor(DELTA_LOSSES[u]), reference_losses=torch.tensor(RHO_IRREDUCIBLE))
    return selector.select(select_context(num_samples=2, update=u, ops=ops))


def exercise_greats(selector: GreatsSelector, u: int) -> torch.Tensor:
    # 4 candidates per update from a pool of 8 (the pass order lives in the state); the
    # gradients turn as the model trains.
    grads = torch.tensor([_unit(a + 15 * u) for a in NEAR_ANGLES]) * torch.arange(1.0, 9.0).unsqueeze(1)
    targets = [FakeOps(gradients=torch.tensor([_unit(40), _unit(70)]))]
    ops = FakeOps(gradients=grads, targets=targets, optimizer=live_optimizer())
    return selector.select(select_context(num_samples=2, update=u, ops=ops))


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


NEAR_ANGLES = (0, 10, 20, 90, 100, 180, 30, 85)
NEAR_TARGETS = torch.tensor([_unit(4), _unit(93)])


def exercise_near(selector: NearSelector, u: int) -> torch.Tensor:
    # The pool's embeddings move as the model trains, so lists rebuilt after a resume would
    # differ from the kept ones. 3 neighbours per target: updates 0 and 1 walk down the
    # lists; update 2 reaches their end and draws the rest among the samples not used yet.
    pool = torch.tensor([_unit(a + 20 * u) for a in NEAR_ANGLES])
    ops = FakeOps(embeddings=pool, targets=[FakeOps(embeddings=NEAR_TARGETS)])
    return selector.select(select_context(num_samples=(2, 2, 3)[u], update=u, ops=ops))


# Two groups of unit embeddings, {0, 2, 4} and {1, 3, 5} (see tests/selectors/test_cluster_less.py).
CLUSTER_EMB = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.96, 0.0, 0.28, 0.0],
        [0.0, 0.96, 0.0, 0.28],
        [0.96, 0.0, -0.28, 0.0],
        [0.0, 0.8, 0.0, 0.6],
    ]
)
CLUSTER_GRADS = torch.tensor([[3.0, 0.0], [0.0, -5.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0], [2.0, 0.0]])


def exercise_cluster_less(selector: ClusterLessSelector, u: int) -> torch.Tensor:
    targets = [FakeOps(gradients=torch.tensor([[1.0, 0.0], [0.6, 0.8]]))]
    ops = FakeOps(embeddings=CLUSTER_EMB, gradients=CLUSTER_GRADS, targets=targets, optimizer=live_optimizer())
    return selector.select(select_context(num_samples=4, update=u, ops=ops))


TSDS_POOL = [{"input_ids": [i, i + 1]} for i in range(6)]
TSDS_TARGETS = [{"input_ids": [9, 9]}]


@functools.cache
def tsds_model() -> torch.nn.Module:
    """Read for its architecture only (part of the prepared file's fingerprint)."""
    return make_model()


def tsds_params(folder: Path) -> dict[str, Any]:
    """Params over a prepared file written by hand for TSDS_POOL, TSDS_TARGETS and tsds_model()."""
    params = TsdsParams(prepared=str(folder))
    settings = embedding_settings(params.settings(), tsds_model())
    fingerprint = pool_fingerprint(
        pool_ids=row_token_ids(TSDS_POOL),
        domains=torch.zeros(len(TSDS_POOL), dtype=torch.long),
        domain_names=("x",),
        target_ids=[row_token_ids(TSDS_TARGETS)],
        settings=settings,
    )
    probabilities = {"probabilities": _t([0.1, 0.2, 0.1, 0.3, 0.2, 0.1])}
    write_prepared(folder, "tsds", probabilities, fingerprint=fingerprint, settings=settings)
    return {"prepared": str(folder)}


def exercise_tsds(selector: TsdsSelector, u: int) -> torch.Tensor:
    ops = FakeOps(dataset=TSDS_POOL, targets=[FakeOps(dataset=TSDS_TARGETS)], model=tsds_model())
    return selector.select(select_context(num_samples=3, update=u, ops=ops))


ADAPT_ANCHORS = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
ADAPT_BATCHES = torch.tensor([[[3.0, 0.0], [1.0, 1.0]], [[0.0, -1.0], [2.0, 1.0]], [[1.0, 3.0], [-1.0, 1.0]]])


def exercise_adapt(weighter: AdaptWeighter, u: int) -> torch.Tensor:
    # The anchors are embedded at train begin only (refresh_every is larger than the run).
    if u == 0:
        weighter.refresh(FakeOps(targets=[FakeOps(embeddings=ADAPT_ANCHORS)]))
    return weighter.weigh(weight_context(torch.ones(2), embeddings=ADAPT_BATCHES[u], step=u + 1))


#: (paradigm, name) -> its exercise; every stateful algorithm needs one.
EXERCISES: dict[tuple[str, str], Exercise] = {
    ("mix", "odm"): Exercise(exercise_odm),
    ("mix", "doremi"): Exercise(exercise_doremi),
    ("mix", "dynamic_moe"): Exercise(exercise_dynamic_moe, given(samples_per_domain=3)),
    ("mix", "aioli"): Exercise(
        exercise_aioli,
        given(round_steps=5, interval_steps=1, sweeps=1, one_hot_factor=0.6, source="train", ema=0.5, eta=1.0),
    ),
    ("mix", "ado"): Exercise(
        exercise_ado, given(prior="uniform", ignore_steps=0, fit_every=2, fit_stride=1, smoothing_window=5)
    ),
    ("select", "delta_loss"): Exercise(exercise_delta_loss),
    ("select", "rho_loss"): Exercise(exercise_rho_loss, given(reference_model="outputs/rho_loss/il", fraction=0.5)),
    ("select", "near"): Exercise(exercise_near, given(neighbours=3)),
    ("select", "greats"): Exercise(exercise_greats, given(fraction=0.5)),
    ("select", "cluster_less"): Exercise(
        exercise_cluster_less, given(cluster_size=3, clustering="kcenter", pick="random")
    ),
    ("select", "tsds"): Exercise(exercise_tsds, tsds_params),
    ("weight", "adapt"): Exercise(exercise_adapt),
}

#: Updates made before the checkpoint; the next one is made by both instances.
UPDATES_BEFORE_SAVE = 2


@dataclass(frozen=True)
class RoundTripCase:
    """A stateful algorithm, built directly or wrapped by its paradigm's ``custom`` algorithm."""

    paradigm: str
    name: str
    wrapped: bool = False

    def __str__(self) -> str:
        return f"{self.paradigm}-custom({self.name})" if self.wrapped else f"{self.paradigm}-{self.name}"

    def build(self, folder: Path) -> Algorithm:
        exercise = EXERCISES[(self.paradigm, self.name)]
        data = exercise.params(folder) if exercise.params else MINIMAL_PARAMS.get((self.paradigm, self.name))
        registry = registry_for(self.paradigm)
        if not self.wrapped:
            return build_from(registry.get(self.name), data)
        cls = registry.get(self.name).cls
        custom = {"path": f"{cls.__module__}:{cls.__qualname__}", "params": data or {}}
        algorithm = build_from(registry.get("custom"), custom)
        assert isinstance(algorithm, Plugin) and type(algorithm.inner) is cls
        return algorithm


ROUND_TRIP_CASES = [RoundTripCase(paradigm, name) for paradigm, name in EXERCISES] + [
    RoundTripCase(paradigm, name, wrapped=True) for paradigm, name in EXERCISES if paradigm in ("select", "weight")
]


@pytest.mark.parametrize("case", ROUND_TRIP_CASES, ids=str)
def test_state_round_trip_after_real_updates(case: RoundTripCase, tmp_path: Path) -> None:
    exercise = EXERCISES[(case.paradigm, case.name)]

    def update(algorithm: Algorithm, u: int) -> Any:
        return exercise.update(unwrap(algorithm), u)

    trained = case.build(tmp_path)
    for u in range(UPDATES_BEFORE_SAVE):
        update(trained, u)
    state = trained.state_dict()
    # The exercise reached every part of the state, so the checks below test something.
    untouched = case.build(tmp_path).state_dict()
    assert state.keys() == untouched.keys()
    unchanged = [key for key in state if same_state(state[key], untouched[key])]
    assert not unchanged, f"{case}: the exercise left {unchanged} as in a fresh instance"

    saved = through_checkpoint(state)
    assert same_state(saved, state)
    resumed = case.build(tmp_path)
    resumed.load_state_dict(saved)
    assert same_state(resumed.state_dict(), state)

    # The resumed instance continues exactly as the one that made the updates.
    assert same_state(update(resumed, UPDATES_BEFORE_SAVE), update(trained, UPDATES_BEFORE_SAVE))
    assert same_state(resumed.state_dict(), trained.state_dict())


def test_every_stateful_algorithm_has_an_exercise() -> None:
    stateful = {(spec.paradigm, spec.name) for spec in SPECS if keeps_state(build(spec))}
    missing = sorted(stateful - set(EXERCISES))
    assert not missing, f"add an exercise to EXERCISES in tests/test_registry.py for: {missing}"
    assert set(EXERCISES) <= stateful, (
        f"exercises of algorithms that keep no state: {sorted(set(EXERCISES) - stateful)}"
    )


# -- examples ---------------------------------------------------------------------------------


EXAMPLE_FILES = sorted([*EXAMPLES.rglob("*.yaml"), *EXAMPLES.rglob("*.yml")])


def example_blocks() -> dict[Path, Any]:
    """The ``datasteer:`` block of every readable example YAML that has one."""
    blocks = {}
    for path in EXAMPLE_FILES:
        try:
            data = read_yaml(path)
        except ConfigError:
            continue  # reported by test_example_parses
        if "datasteer" in data:
            blocks[path] = data["datasteer"]
    return blocks


def test_every_algorithm_has_an_example() -> None:
    covered = {
        (paradigm, stage.algorithm)
        for block in example_blocks().values()
        for paradigm, stage in load_steering(block).stages.items()
    }
    missing = [spec_id(spec) for spec in SPECS if (spec.paradigm, spec.name) not in covered]
    assert not missing, f"no example under examples/ for: {', '.join(missing)}"


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_parses(path: Path) -> None:
    data = read_yaml(path)
    if "datasteer" not in data:
        pytest.skip("not a run config (no datasteer: block)")
    config = load_steering(data["datasteer"])
    for paradigm, stage in config.stages.items():
        assert isinstance(stage.params, registry_for(paradigm).get(stage.algorithm).params_cls)


# -- registration rules -----------------------------------------------------------------------


def test_registering_without_params_raises() -> None:
    registry: Registry[Any] = Registry("mix", "datasteer.mixers")

    class NoParams(Mixer):
        """No Params attribute."""

    with pytest.raises(TypeError, match="NoParams: an algorithm needs a `Params` dataclass"):
        registry.register("no_params")(NoParams)

    class NotADataclass(Mixer):
        """Params is a plain class."""

        class Params:
            pass

    with pytest.raises(TypeError, match="needs a `Params` dataclass"):
        registry.register("plain")(NotADataclass)
    assert "no_params" not in registry._specs and "plain" not in registry._specs


def test_duplicate_name_raises() -> None:
    registry: Registry[Any] = Registry("mix", "datasteer.mixers")

    @dataclasses.dataclass
    class P:
        pass

    class First(Mixer):
        """First."""

        Params = P

    class Second(Mixer):
        """Second."""

        Params = P

    registry.register("twin")(First)
    registry.register("twin")(First)  # re-registering the same class (a module re-import) is harmless
    with pytest.raises(TypeError, match="mix algorithm 'twin' is registered twice"):
        registry.register("twin")(Second)
    assert registry._specs["twin"].cls is First


def test_unknown_paradigm_in_registry_for() -> None:
    with pytest.raises(ConfigError, match="unknown paradigm 'mixing'; choose one of select, mix, weight"):
        registry_for("mixing")


def test_unknown_name_lists_registered_names() -> None:
    names = registry_for("select").names()
    assert "random" in names
    with pytest.raises(ConfigError) as info:
        registry_for("select").get("nope", where="x.algorithm")
    assert str(info.value) == f"x.algorithm: unknown select algorithm 'nope'; choose one of {', '.join(names)}"


@pytest.mark.parametrize("base", [Selector, Mixer, Weighter], ids=["select", "mix", "weight"])
def test_an_algorithm_without_its_method_cannot_be_built(base: type) -> None:
    @dataclasses.dataclass
    class P:
        pass

    incomplete = type("Incomplete", (base,), {"Params": P, "__doc__": "Lacks its paradigm's method."})
    with pytest.raises(TypeError, match="abstract"):
        incomplete(P())
