"""Tests of datasteer.config: strict dataclass parsing, the datasteer block, overrides and YAML reading."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pytest

from datasteer.config import (
    SteeringConfig,
    apply_overrides,
    doc,
    load_steering,
    parse_dataclass,
    parse_scalar,
    read_yaml,
)
from datasteer.errors import ConfigError
from datasteer.mixers.random import RandomMixParams
from datasteer.mixers.scheduled import ScheduledParams
from datasteer.registry import registry_for
from datasteer.selectors.random import RandomSelectParams


@dataclass
class Inner:
    """A nested block."""

    depth: int = doc("An integer.", default=1)


@dataclass
class Example:
    """Every kind of field parse_dataclass handles."""

    name: str = doc("Required string.")
    count: int = doc("An integer.", default=3)
    rate: float = doc("A float.", default=0.5)
    flag: bool = doc("A boolean.", default=False)
    sizes: list[int] = doc("A list of integers.", default_factory=list)
    mode: Literal["fast", "slow"] = doc("A choice.", default="fast")
    limit: int | None = doc("An optional integer.", default=None)
    inner: Inner = doc("A nested dataclass.", default_factory=Inner)

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ConfigError(f"count: must be >= 0, got {self.count}")


def parse(data: object) -> Example:
    return parse_dataclass(Example, data, "block")


# -- parse_dataclass ------------------------------------------------------------------------


def test_parse_fills_defaults_and_converts_values() -> None:
    got = parse({"name": "x", "rate": 2, "sizes": [1, 2], "mode": "slow", "limit": 7, "inner": {"depth": 4}})
    assert got == Example(name="x", count=3, rate=2.0, flag=False, sizes=[1, 2], mode="slow", limit=7, inner=Inner(4))
    assert type(got.rate) is float  # an integer given for a float is converted, not kept as int


def test_none_is_an_empty_mapping() -> None:
    assert parse_dataclass(Inner, None, "block") == Inner(depth=1)


def test_non_mapping_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^block: expected a mapping"):
        parse_dataclass(Inner, [1, 2], "block")


def test_unknown_key_names_the_dotted_key_and_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"name": "x", "colour": 1})
    message = str(info.value)
    assert message.startswith("block.colour: unknown key")
    assert "allowed: name, count, rate, flag, sizes, mode, limit, inner" in message
    assert "did you mean" not in message  # nothing is close to "colour"


def test_unknown_key_suggests_a_close_spelling() -> None:
    with pytest.raises(ConfigError, match=r"block\.cuont: unknown key \(did you mean 'count'\?\)"):
        parse({"name": "x", "cuont": 1})


def test_unknown_key_in_a_nested_block_has_the_full_path() -> None:
    with pytest.raises(
        ConfigError, match=r"^block\.inner\.dept: unknown key \(did you mean 'depth'\?\); allowed: depth"
    ):
        parse({"name": "x", "inner": {"dept": 2}})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("count", "3", "expected an integer"),
        ("count", 3.0, "expected an integer"),
        ("count", True, "expected an integer"),  # bool is an int subclass, but not an integer here
        ("rate", "0.5", "expected a number"),
        ("rate", False, "expected a number"),
        ("flag", 1, "expected true or false"),
        ("flag", "yes", "expected true or false"),
        ("name", 5, "expected a string"),
        ("sizes", "1,2", "expected a list"),
        ("sizes", 3, "expected a list"),
        ("mode", "medium", "'medium' is not allowed; choose one of 'fast', 'slow'"),
        ("limit", "7", "expected int | null"),
        ("inner", 3, "expected a mapping"),
    ],
)
def test_wrong_types_are_rejected(key: str, value: object, expected: str) -> None:
    data = {"name": "x", key: value}
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert str(info.value).startswith(f"block.{key}:")
    assert expected in str(info.value)


def test_wrong_type_inside_a_list_names_the_item() -> None:
    with pytest.raises(ConfigError, match=r"^block\.sizes\[1\]: expected an integer"):
        parse({"name": "x", "sizes": [1, "two"]})


def test_optional_accepts_null() -> None:
    assert parse({"name": "x", "limit": None}).limit is None


def test_required_key_missing() -> None:
    with pytest.raises(ConfigError, match=r"^block\.name: required key is missing$"):
        parse({"count": 1})


def test_post_init_errors_are_prefixed_with_the_path() -> None:
    with pytest.raises(ConfigError, match=r"^block\.count: must be >= 0, got -1$"):
        parse({"name": "x", "count": -1})


def test_post_init_error_of_a_nested_algorithm_params() -> None:
    with pytest.raises(ConfigError, match=r"^datasteer\.params\.fraction: must be in \(0, 1\], got 1\.5$"):
        parse_dataclass(RandomSelectParams, {"fraction": 1.5}, "datasteer.params")


# -- load_steering ----------------------------------------------------------------------------


def test_load_steering_types_params_into_the_algorithm_dataclass() -> None:
    config = load_steering(
        {
            "paradigm": "mix",
            "algorithm": "random",
            "warmup_steps": 4,
            "update_every": 2,
            "params": {"concentration": 3},
        }
    )
    assert isinstance(config, SteeringConfig) and config.paradigms == ("mix",)
    stage = config.stages["mix"]
    assert (stage.algorithm, stage.warmup_steps, stage.update_every) == ("random", 4, 2)
    assert stage.params == RandomMixParams(concentration=3.0)
    assert type(stage.params.concentration) is float


def test_load_steering_without_params_uses_defaults() -> None:
    config = load_steering({"paradigm": "select", "algorithm": "random"})
    assert config.stages["select"].params == RandomSelectParams(replacement=False, fraction=None)
    assert config.stages["select"].max_updates is None
    assert (config.lag, config.seed, config.log_file) == (None, None, "steering.jsonl")


def test_load_steering_parses_nested_schedule_points() -> None:
    config = load_steering(
        {"paradigm": "mix", "algorithm": "scheduled", "params": {"schedule": [[0, [1, 0]], [10, [0, 1]]]}}
    )
    assert config.stages["mix"].params == ScheduledParams(schedule=[(0, [1.0, 0.0]), (10, [0.0, 1.0])])


def test_unknown_paradigm() -> None:
    with pytest.raises(
        ConfigError, match=r"^datasteer\.paradigm: 'mixing' is not allowed; choose one of 'select', 'mix', 'weight'"
    ):
        load_steering({"paradigm": "mixing", "algorithm": "static"})


def test_unknown_algorithm_lists_the_registered_names() -> None:
    with pytest.raises(ConfigError) as info:
        load_steering({"paradigm": "mix", "algorithm": "statc"})
    message = str(info.value)
    assert message.startswith("datasteer.algorithm: unknown mix algorithm 'statc' (did you mean 'static'?)")
    assert message.endswith("; choose one of " + ", ".join(registry_for("mix").names()))
    assert {"random", "scheduled", "static"} <= set(registry_for("mix").names())


def test_unknown_param_key_names_the_params_path() -> None:
    with pytest.raises(
        ConfigError, match=r"^datasteer\.params\.concentraton: unknown key \(did you mean 'concentration'\?\)"
    ):
        load_steering({"paradigm": "mix", "algorithm": "random", "params": {"concentraton": 2.0}})


def test_non_mapping_block() -> None:
    with pytest.raises(ConfigError, match=r"^datasteer: expected a mapping"):
        load_steering(["mix", "static"])


def test_missing_algorithm() -> None:
    with pytest.raises(ConfigError, match=r"^datasteer\.algorithm: required key is missing"):
        load_steering({"paradigm": "mix"})


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"update_every": 0}, r"^datasteer\.update_every: must be >= 1"),
        ({"warmup_steps": -1}, r"^datasteer\.warmup_steps: must be >= 0, got -1"),
        ({"lag": 0}, r"^datasteer\.lag: must be >= 1"),
        ({"max_updates": 0}, r"^datasteer\.max_updates: must be >= 1 or null"),
        ({"update_every": 1.5}, r"^datasteer\.update_every: expected an integer"),
    ],
)
def test_impossible_schedule_values(extra: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_steering({"paradigm": "mix", "algorithm": "random", **extra})


def test_weight_paradigm_rejects_update_every() -> None:
    with pytest.raises(ConfigError, match=r"^datasteer\.update_every: weighting acts at every step"):
        load_steering({"paradigm": "weight", "algorithm": "uniform", "update_every": 2})
    with pytest.raises(ConfigError, match=r"^datasteer\.update_every: weighting acts at every step"):
        load_steering({"paradigm": "weight", "algorithm": "uniform", "max_updates": 3})
    assert (
        load_steering({"paradigm": "weight", "algorithm": "uniform", "update_every": 1}).stages["weight"].update_every
        == 1
    )
    with pytest.raises(ConfigError, match=r"^datasteer\.weight\.update_every: weighting acts at every step"):
        load_steering({"weight": {"algorithm": "uniform", "update_every": 2}})


# -- the staged form -------------------------------------------------------------------------------


def test_staged_form_parses_each_stage_with_its_own_schedule() -> None:
    config = load_steering(
        {
            "seed": 3,
            "weight": {"algorithm": "uniform", "warmup_steps": 5},
            "select": {"algorithm": "random", "update_every": 4, "params": {"fraction": 0.5}},
            "mix": {"algorithm": "random", "update_every": 2, "max_updates": 3, "params": {"concentration": 2}},
        }
    )
    assert config.paradigms == ("mix", "select", "weight")  # composition order, whatever the YAML order
    assert config.describe() == "mix/random + select/random + weight/uniform"
    assert (config.stages["mix"].update_every, config.stages["mix"].max_updates) == (2, 3)
    assert config.stages["mix"].params == RandomMixParams(concentration=2.0)
    assert config.stages["select"].params == RandomSelectParams(fraction=0.5)
    assert config.stages["weight"].warmup_steps == 5 and config.seed == 3


def test_one_stage_forms_are_the_same_config() -> None:
    single = load_steering({"paradigm": "mix", "algorithm": "random", "update_every": 2, "seed": 1})
    staged = load_steering({"mix": {"algorithm": "random", "update_every": 2}, "seed": 1})
    assert single == staged


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"mix": {"algorithm": "random"}, "algorithm": "loss"}, r"^datasteer\.algorithm: the staged form"),
        ({"mix": {"algorithm": "random"}, "update_every": 2}, r"^datasteer\.update_every: the staged form"),
        ({"mix": {"algorithm": "random", "update_evry": 2}}, r"^datasteer\.mix\.update_evry: unknown key \(did you"),
        ({"mix": {"params": {}}}, r"^datasteer\.mix\.algorithm: required key is missing"),
        ({"select": {"algorithm": "odm"}}, r"^datasteer\.select\.algorithm: unknown select algorithm 'odm'"),
        ({"mix": "odm"}, r"^datasteer\.mix: expected a mapping"),
        ({"mix": {"algorithm": "random", "params": {"x": 1}}}, r"^datasteer\.mix\.params\.x: unknown key"),
        ({"mix": {"algorithm": "random"}, "sede": 1}, r"^datasteer\.sede: unknown key \(did you mean 'seed'\?\)"),
    ],
)
def test_staged_form_errors_name_the_key(block: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_steering(block)


def test_load_steering_does_not_modify_its_input() -> None:
    data = {"paradigm": "mix", "algorithm": "random", "params": {"concentration": 2.0}}
    load_steering(data)
    assert data == {"paradigm": "mix", "algorithm": "random", "params": {"concentration": 2.0}}


# -- apply_overrides --------------------------------------------------------------------------


def test_overrides_reach_nested_keys_and_leave_the_input_alone() -> None:
    config = {"learning_rate": 0.1, "datasteer": {"paradigm": "mix", "params": {"alpha": 0.9}}}
    got = apply_overrides(config, ["datasteer.params.alpha=0.5", "learning_rate=1e-4", "seed=7"])
    assert got == {"learning_rate": 1e-4, "seed": 7, "datasteer": {"paradigm": "mix", "params": {"alpha": 0.5}}}
    assert isinstance(got["learning_rate"], float)  # YAML alone would read "1e-4" as a string
    assert config == {"learning_rate": 0.1, "datasteer": {"paradigm": "mix", "params": {"alpha": 0.9}}}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[0.5,0.5]", [0.5, 0.5]),
        ("true", True),
        ("null", None),
        ("static", "static"),
        ("3", 3),
        ("", ""),
    ],
)
def test_override_values(text: str, expected: object) -> None:
    got = apply_overrides({}, [f"key={text}"])["key"]
    assert got == expected
    assert type(got) is type(expected)


def test_overrides_create_missing_blocks() -> None:
    got = apply_overrides({"datasteer": {"params": None}}, ["datasteer.params.alpha=2", "new.block.key=x"])
    assert got == {"datasteer": {"params": {"alpha": 2}}, "new": {"block": {"key": "x"}}}


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match=r"^datasteer\.params\.alpha: overrides are written key=value"):
        apply_overrides({}, ["datasteer.params.alpha"])
    with pytest.raises(ConfigError, match="overrides are written key=value"):
        apply_overrides({}, ["=3"])


def test_override_inside_a_non_block() -> None:
    with pytest.raises(ConfigError, match=r"^seed\.x: 'seed' is not a block"):
        apply_overrides({"seed": 3}, ["seed.x=1"])


def test_override_value_with_equals_sign_keeps_the_rest() -> None:
    assert apply_overrides({}, ["run_name=a=b"]) == {"run_name": "a=b"}


# -- read_yaml --------------------------------------------------------------------------------


def test_read_yaml(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\ndatasteer:\n  paradigm: mix\n")
    assert read_yaml(path) == {"seed": 3, "datasteer": {"paradigm": "mix"}}


def test_read_yaml_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        read_yaml(tmp_path / "absent.yaml")


def test_read_yaml_non_mapping(tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_yaml(path)


def test_read_yaml_invalid_yaml(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(path)


def test_read_yaml_empty_file_is_an_empty_mapping(tmp_path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert read_yaml(path) == {}


def test_only_exponent_floats_are_rescued_from_strings() -> None:
    assert parse_scalar("1e-4") == pytest.approx(1e-4)
    assert parse_scalar("2.5E3") == 2500.0
    assert parse_scalar("nan") == "nan" and parse_scalar("inf") == "inf"
    assert parse_scalar("no") == "no" and parse_scalar("off") == "off"
    assert parse_scalar("false") is False


@pytest.mark.parametrize("log_file", ["/etc/passwd", "../notes.txt", "sub/../../x.jsonl", "", "logs/"])
def test_log_file_must_stay_inside_the_output_dir(log_file: str) -> None:
    """A fresh run replaces its record: a path outside output_dir would overwrite a user's file."""
    with pytest.raises(ConfigError, match=r"^datasteer\.log_file: .* must be a file name relative to output_dir"):
        load_steering({"paradigm": "mix", "algorithm": "random", "log_file": log_file})
    with pytest.raises(ConfigError, match=r"^datasteer\.log_file:"):
        load_steering({"mix": {"algorithm": "random"}, "log_file": log_file})
    assert load_steering({"paradigm": "mix", "algorithm": "random", "log_file": "logs/steer.jsonl"})


def test_max_nonfinite_steps_is_a_run_wide_key_of_both_forms() -> None:
    assert load_steering({"paradigm": "mix", "algorithm": "odm"}).max_nonfinite_steps == 3
    single = load_steering({"paradigm": "mix", "algorithm": "odm", "max_nonfinite_steps": 0})
    staged = load_steering({"mix": {"algorithm": "odm"}, "max_nonfinite_steps": 5})
    assert (single.max_nonfinite_steps, staged.max_nonfinite_steps) == (0, 5)
    with pytest.raises(ConfigError, match=r"^datasteer\.max_nonfinite_steps: must be >= 0"):
        load_steering({"mix": {"algorithm": "odm"}, "max_nonfinite_steps": -1})
    with pytest.raises(ConfigError, match=r"^datasteer\.max_nonfinite_steps: expected an integer"):
        load_steering({"paradigm": "mix", "algorithm": "odm", "max_nonfinite_steps": 1.5})
    with pytest.raises(ConfigError, match=r"puts this key inside a stage; allowed at the top: .*max_nonfinite_steps"):
        load_steering({"mix": {"algorithm": "odm"}, "warmup_steps": 1})
