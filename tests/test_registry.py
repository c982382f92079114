"""Contract tests over every registered algorithm, and the registry's own rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from datasteer.algorithm import Algorithm
from datasteer.config import PARADIGMS, load_steering, parse_dataclass, read_yaml
from datasteer.errors import ConfigError
from datasteer.mixers.base import Mixer
from datasteer.registry import AlgorithmSpec, Registry, registry_for
from datasteer.selectors.base import Selector
from datasteer.weighters.base import Weighter

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: Smallest valid params of algorithms that have required parameters.
MINIMAL_PARAMS: dict[tuple[str, str], dict[str, Any]] = {
    ("mix", "scheduled"): {"schedule": [[0, [1.0]]]},
    ("mix", "doremi"): {"reference_model": "outputs/doremi/reference"},
    ("select", "tsds"): {"prepared": "outputs/prepared/tsds"},
    ("select", "custom"): {"path": "datasteer.selectors.random:RandomSelector"},
    ("weight", "custom"): {"path": "datasteer.weighters.uniform:UniformWeighter"},
    ("weight", "reducible"): {"reference_model": "outputs/doremi/reference"},
}

BASES = {"select": Selector, "mix": Mixer, "weight": Weighter}

SPECS = [spec for paradigm in PARADIGMS for spec in registry_for(paradigm)]


def spec_id(spec: AlgorithmSpec) -> str:
    return f"{spec.paradigm}-{spec.name}"


def build(spec: AlgorithmSpec) -> Algorithm:
    data = MINIMAL_PARAMS.get((spec.paradigm, spec.name))
    params = parse_dataclass(spec.params_cls, data, "datasteer.params")
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


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_state_round_trip(spec: AlgorithmSpec) -> None:
    state = build(spec).state_dict()
    fresh = build(spec)
    fresh.load_state_dict(state)
    assert same_state(fresh.state_dict(), state)


def test_build_rejects_params_of_another_algorithm() -> None:
    with pytest.raises(TypeError, match="expected params of type"):
        registry_for("mix").build("static", registry_for("mix").get("random").params_cls())


def test_stateless_algorithm_rejects_foreign_state() -> None:
    algorithm = build(registry_for("weight").get("uniform"))
    with pytest.raises(ValueError, match="keeps no state"):
        algorithm.load_state_dict({"ema": torch.zeros(2)})


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
