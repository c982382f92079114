"""Strict configuration: dataclasses parsed from plain dicts (YAML), with clear errors.

A run is one YAML file: the training framework's own keys, unchanged, plus one
``datasteer:`` block parsed into :class:`SteeringConfig`. Each algorithm declares its
parameters as a dataclass; :func:`parse_dataclass` fills it from a dict and rejects
unknown keys, wrong types and impossible values with one :class:`ConfigError` that names
the key (``datasteer.params.alpha``) and what is allowed. Nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from datasteer.errors import ConfigError

T = TypeVar("T")

#: The paradigms, in the order their stages compose (each narrows what the next sees).
PARADIGMS = ("mix", "select", "weight")


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass ``field`` that carries its help text (shown by ``datasteer list``)."""
    metadata = {"help": text}
    return field(metadata=metadata, **kwargs)


def _key_text(key: object) -> str:
    """A key as an error message shows it: as written, or quoted when it is not a plain word
    (a key with a newline or spaces must not break the one-line message)."""
    if isinstance(key, str) and key and key.isprintable() and not any(c.isspace() for c in key):
        return key
    return repr(key)


def _suggest(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lists/ints where lossless."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {allowed}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple, Sequence):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list ({_type_name(tp)}), got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        ktp, vtp = get_args(tp) or (Any, Any)
        return {_coerce(k, ktp, where): _coerce(v, vtp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return parse_dataclass(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def parse_dataclass(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, strictly.

    Args:
        cls: the dataclass type.
        data: a mapping (``None`` means empty).
        where: the dotted path of ``data`` in the config, used in error messages.

    Raises:
        ConfigError: on an unknown key, a missing required key, a value of the wrong type,
            or a value rejected by the dataclass's ``__post_init__``.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            allowed = ", ".join(fields) or "(none)"
            raise ConfigError(
                f"{where}.{_key_text(key)}: unknown key{_suggest(str(key), list(fields))}; allowed: {allowed}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            raise ConfigError(f"{where}.{name}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}.{err}") from None


def field_help(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default as text, help) of each field of a params dataclass, for listings."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows


@dataclass
class StageConfig:
    """One paradigm's stage of a run: its algorithm, params and schedule."""

    algorithm: str = doc("Registry name of the algorithm (see `datasteer list`).")
    params: Any = doc("The algorithm's own parameters (its params dataclass).", default=None)
    warmup_steps: int = doc(
        "Optimizer steps trained before the first update (weight: before weights apply).", default=0
    )
    update_every: int = doc("Optimizer steps between updates (select and mix).", default=1)
    max_updates: int | None = doc("Stop updating after this many updates; the last stays in force.", default=None)
    stream_window: float | None = doc(
        "Select with streamed domains: each update chooses a domain's share of its steps from the next "
        "stream_window x share rows of that domain's stream (the candidate window; the rest are skipped). "
        "Default: the selector's own ratio (rho_loss, greats: 1 / fraction), else 4.",
        default=None,
    )

    def __post_init__(self) -> None:
        if self.stream_window is not None and self.stream_window < 1:
            raise ConfigError(
                f"stream_window: must be >= 1 (candidate rows per selected row), got {self.stream_window}"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.update_every < 1:
            raise ConfigError(f"update_every: must be >= 1 (steps between updates), got {self.update_every}")
        if self.max_updates is not None and self.max_updates < 1:
            raise ConfigError(f"max_updates: must be >= 1 or null, got {self.max_updates}")


_SEED_HELP = "Seed of every steering draw; default: the training seed."
_LAG_HELP = (
    "Steps between deciding an update and the first step it shapes; default: what the data "
    "loader's prefetching needs (1 without worker processes)."
)
_LOG_HELP = "Event log written in the output directory."
_NONFINITE_HELP = (
    "Stop the run with an error when the training loss is NaN or infinite for this many consecutive "
    "optimizer steps (0: never stop)."
)


_SCORING_HELP = (
    "Rows per batch of the scoring passes (losses, embeddings, gradient features); default: "
    "per_device_eval_batch_size. Rows are sorted by length first, so batches carry little padding."
)


@dataclass
class _RunKeys:
    """Keys of the ``datasteer:`` block that apply to the whole run (every stage)."""

    seed: int | None = doc(_SEED_HELP, default=None)
    lag: int | None = doc(_LAG_HELP, default=None)
    log_file: str = doc(_LOG_HELP, default="steering.jsonl")
    max_nonfinite_steps: int = doc(_NONFINITE_HELP, default=3)
    scoring_batch_size: int | None = doc(_SCORING_HELP, default=None)

    def __post_init__(self) -> None:
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"max_nonfinite_steps: must be >= 0 (0: never stop), got {self.max_nonfinite_steps}")
        if self.lag is not None and self.lag < 1:
            raise ConfigError(f"lag: must be >= 1 (a plan cannot shape a batch already drawn), got {self.lag}")
        if self.scoring_batch_size is not None and self.scoring_batch_size < 1:
            raise ConfigError(f"scoring_batch_size: must be >= 1 or null, got {self.scoring_batch_size}")
        # The record is replaced at the start of every fresh run: it must stay inside output_dir.
        path = Path(self.log_file)
        log_file = self.log_file
        if not log_file.strip() or path.is_absolute() or ".." in path.parts or log_file.endswith(("/", "\\")):
            raise ConfigError(
                f"log_file: {log_file!r} must be a file name relative to output_dir, without '..' "
                "(a fresh run replaces it)"
            )

    def run_keys(self) -> dict[str, Any]:
        """These keys as keyword arguments (of :class:`SteeringConfig`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(_RunKeys)}


@dataclass
class _SingleStageKeys:
    """The stage keys of the one-paradigm form."""

    paradigm: Literal["select", "mix", "weight"] = doc("Which paradigm steers the run.", default="mix")
    algorithm: str = doc("Registry name of the algorithm (see `datasteer list`).", default="")
    params: Any = doc("The algorithm's own parameters (its params dataclass).", default=None)
    warmup_steps: int = doc("Optimizer steps trained before the first update.", default=0)
    update_every: int = doc("Optimizer steps between updates (select and mix).", default=1)
    max_updates: int | None = doc("Stop updating after this many updates; the last stays in force.", default=None)


@dataclass
class _SingleStage(_RunKeys, _SingleStageKeys):
    """The one-paradigm form of the block: ``paradigm:``, one stage's keys, then the run's."""


#: Keys that apply to the whole run, in both forms of the block.
RUN_KEYS = tuple(f.name for f in dataclasses.fields(_RunKeys))
#: Keys of the one-paradigm form, in the order error messages list them.
SINGLE_KEYS = ("paradigm", "algorithm", "params", "warmup_steps", "update_every", "max_updates", *RUN_KEYS)
#: Keys of the staged form.
STAGED_KEYS = (*PARADIGMS, *RUN_KEYS)


@dataclass
class SteeringConfig:
    """The parsed ``datasteer:`` block: one stage per paradigm used, plus run-wide keys.

    ``stages`` is ordered mix, select, weight (the order in which the stages compose).
    """

    stages: dict[str, StageConfig]
    seed: int | None = None
    lag: int | None = None
    log_file: str = "steering.jsonl"
    max_nonfinite_steps: int = 3
    scoring_batch_size: int | None = None

    @property
    def paradigms(self) -> tuple[str, ...]:
        """The paradigms of this run, in composition order."""
        return tuple(self.stages)

    def describe(self) -> str:
        """``mix/odm + select/loss``: what the run steers with."""
        return " + ".join(f"{p}/{s.algorithm}" for p, s in self.stages.items())

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("datasteer: give at least one of the stages mix:, select:, weight:")
        self.stages = {p: self.stages[p] for p in PARADIGMS if p in self.stages}


def _parse_stage(paradigm: str, raw: Mapping[str, Any], where: str) -> StageConfig:
    from datasteer.registry import registry_for

    data = dict(raw)
    raw_params = data.pop("params", None)
    if "algorithm" not in data:
        raise ConfigError(f"{where}.algorithm: required key is missing")
    stage = parse_dataclass(StageConfig, data, where)
    if paradigm == "weight" and (stage.update_every != 1 or stage.max_updates is not None):
        raise ConfigError(
            f"{where}.update_every: weighting acts at every step; remove update_every/max_updates "
            "(they apply to select and mix)"
        )
    if paradigm != "select" and stage.stream_window is not None:
        raise ConfigError(f"{where}.stream_window: applies to a select stage only (its candidate windows)")
    spec = registry_for(paradigm).get(stage.algorithm, where=f"{where}.algorithm")
    stage.params = parse_dataclass(spec.params_cls, raw_params, f"{where}.params")
    return stage


def load_steering(data: Any, where: str = "datasteer") -> SteeringConfig:
    """Parse and validate a ``datasteer:`` block, including each algorithm's params.

    Two forms: one paradigm (``paradigm:``, ``algorithm:``, ``params:`` and its schedule at
    the top of the block), or stages (``mix:``, ``select:``, ``weight:`` sub-blocks, each
    with ``algorithm``, ``params`` and its own schedule). After this returns, each stage's
    ``params`` is an instance of its algorithm's params dataclass.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping with 'paradigm' and 'algorithm' (or mix:/select:/weight: "
            f"stages), got {data!r}"
        )
    raw = dict(data)
    staged = [p for p in PARADIGMS if p in raw]
    if not staged:
        raw_params = raw.pop("params", None)
        single = parse_dataclass(_SingleStage, raw, where)
        if "paradigm" not in raw:
            raise ConfigError(f"{where}.paradigm: required key is missing (or give mix:, select:, weight: stages)")
        if "algorithm" not in raw:
            raise ConfigError(f"{where}.algorithm: required key is missing")
        stage_raw = {k: raw[k] for k in ("algorithm", "warmup_steps", "update_every", "max_updates") if k in raw}
        stage = _parse_stage(single.paradigm, {**stage_raw, "params": raw_params}, where)
        return SteeringConfig({single.paradigm: stage}, **single.run_keys())
    flat = [k for k in raw if k in SINGLE_KEYS and k not in STAGED_KEYS]
    if flat:
        raise ConfigError(
            f"{where}.{flat[0]}: the staged form (mix:, select:, weight:) puts this key inside a stage; "
            f"allowed at the top: {', '.join(STAGED_KEYS)}"
        )
    stages = {}
    for paradigm in staged:
        block = raw.pop(paradigm)
        if not isinstance(block, Mapping):
            raise ConfigError(f"{where}.{paradigm}: expected a mapping with 'algorithm' (and params, schedule)")
        stages[paradigm] = _parse_stage(paradigm, block, f"{where}.{paradigm}")
    run = parse_dataclass(_RunKeys, raw, where)
    return SteeringConfig(stages, **run.run_keys())


#: A float written without a dot (``1e-4``): YAML 1.1 reads it as a string, YAML 1.2 as a float.
EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
_YAML11_BOOLEAN_WORDS = frozenset({"y", "n", "yes", "no", "on", "off"})


def parse_scalar(text: str) -> Any:
    """Parse a command-line value: YAML scalars and lists, plus ``1e-4`` style floats.

    Only ``true``/``false`` are booleans: ``no``, ``off``, ``yes`` and ``on`` stay strings
    (``save_strategy=no`` means the string ``"no"``, not YAML 1.1's ``False``).

    Raises:
        ConfigError: the text does not parse as YAML (e.g. an unclosed bracket).
    """
    if text.strip().lower() in _YAML11_BOOLEAN_WORDS:
        return text
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or err.__class__.__name__
        raise ConfigError(
            f"{text!r} is not a YAML value ({problem}); close its brackets or quotes, or quote the whole value"
        ) from None
    if isinstance(value, str) and EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    return value


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys reach nested blocks) to a copy of config."""
    result = _deep_copy(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item}: overrides are written key=value, e.g. datasteer.params.alpha=0.5")
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: '{part}' is not a block, cannot set a key inside it")
            node = child
        try:
            node[parts[-1]] = parse_scalar(text)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run config file; a missing file or a non-mapping document is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return data
