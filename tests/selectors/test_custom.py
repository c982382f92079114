"""The custom selector: loading by path, config-time errors, delegation, and the shipped template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datasteer.config import load_steering, parse_dataclass
from datasteer.errors import ConfigError
from datasteer.registry import SELECTORS
from datasteer.selectors.custom import CustomParams, CustomSelector, load_selector_class
from datasteer.selectors.random import RandomSelector
from tests.factories import select_context, user_module_dir

TEMPLATE = Path(__file__).resolve().parents[2] / "examples" / "custom_selector.py"

USER_MODULE = '''
from dataclasses import dataclass
from typing import Any

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError
from datasteer.selectors.base import Selector


@dataclass
class FirstParams:
    offset: int = doc("First index.", default=0)

    def __post_init__(self) -> None:
        if self.offset < 0:
            raise ConfigError(f"offset: must be >= 0, got {self.offset}")


class FirstSelector(Selector):
    """The first num_samples indices after offset, then counts its calls."""

    Params = FirstParams
    needs_model = True

    def __init__(self, params: FirstParams) -> None:
        super().__init__(params)
        self.calls = 0
        self.prepared = None

    def prepare_model(self, model: Any) -> None:
        self.prepared = model

    def select(self, ctx: Any) -> torch.Tensor:
        self.calls += 1
        return torch.arange(self.params.offset, self.params.offset + ctx.num_samples)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]


class NoParams(Selector):
    """A selector without Params."""

    def select(self, ctx: Any) -> torch.Tensor:
        return torch.arange(1)


class NotASelector:
    Params = FirstParams
'''


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with ``user_sel_mod.py`` (also importable as a module) and a broken file."""
    return user_module_dir(tmp_path, monkeypatch, "user_sel_mod", USER_MODULE)


def parse(raw: dict) -> CustomParams:
    return parse_dataclass(CustomParams, raw, "datasteer.params")


@pytest.mark.parametrize(
    "path", ["user_sel_mod:FirstSelector", "user_sel_mod.FirstSelector", "user_sel_mod.py:FirstSelector"]
)
def test_loads_by_module_dotted_or_file_path(user_dir: Path, path: str) -> None:
    params = parse({"path": path, "params": {"offset": 2}})
    selector = SELECTORS.build("custom", params)
    assert isinstance(selector, CustomSelector) and type(selector.inner).__name__ == "FirstSelector"
    assert selector.select(select_context(num_samples=3, pool_size=8)).tolist() == [2, 3, 4]


def test_builtin_class_by_dotted_path() -> None:
    assert load_selector_class("datasteer.selectors.random:RandomSelector") is RandomSelector
    assert load_selector_class("datasteer.selectors.random.RandomSelector") is RandomSelector


def test_delegates_state_needs_model_and_prepare_model(user_dir: Path) -> None:
    selector = CustomSelector(parse({"path": "user_sel_mod.py:FirstSelector"}))
    assert selector.needs_model is True  # the user's class asks for the model; the controller reads this
    selector.select(select_context(num_samples=1, pool_size=2))
    selector.select(select_context(num_samples=1, pool_size=2))
    assert selector.state_dict() == {"calls": 2}
    fresh = CustomSelector(parse({"path": "user_sel_mod.py:FirstSelector"}))
    fresh.load_state_dict(selector.state_dict())
    assert fresh.state_dict() == {"calls": 2}
    model = torch.nn.Linear(1, 1)
    fresh.prepare_model(model)
    assert fresh.inner.prepared is model  # type: ignore[attr-defined]
    assert CustomSelector(parse({"path": "datasteer.selectors.random:RandomSelector"})).needs_model is False


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"path": "NoColonOrDot"}, "datasteer.params.path: 'NoColonOrDot' is not 'package.module:ClassName'"),
        ({"path": "no_such_module_xyz:Thing"}, "path: cannot import module 'no_such_module_xyz' (ModuleNotFoundError"),
        ({"path": "missing.py:Thing"}, "datasteer.params.path: no such file 'missing.py'"),
        ({"path": "broken.py:Thing"}, "path: importing 'broken.py' failed (RuntimeError: boom)"),
        ({"path": "user_sel_mod:Nope"}, "path: 'user_sel_mod' has no attribute 'Nope'"),
        ({"path": "user_sel_mod:NotASelector"}, "is not a subclass of datasteer.selectors.base.Selector"),
        ({"path": "datasteer.mixers.static:StaticMixer"}, "is not a subclass of datasteer.selectors.base.Selector"),
        ({"path": "user_sel_mod:NoParams"}, "needs a `Params` dataclass"),
        ({"path": "user_sel_mod:FirstSelector", "params": {"offst": 1}}, "datasteer.params.params.offst: unknown key"),
        ({"path": "user_sel_mod:FirstSelector", "params": {"offset": -1}}, "params.offset: must be >= 0"),
        ({"path": "user_sel_mod:FirstSelector", "params": {"offset": "a"}}, "params.offset: expected an integer"),
        ({"params": {}}, "datasteer.params.path: required key is missing"),
    ],
)
def test_errors_at_config_parse_time(user_dir: Path, raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_steering({"paradigm": "select", "algorithm": "custom", "params": raw})
    assert message in str(err.value)


# -- the shipped template ---------------------------------------------------------------------


def template(params: dict) -> CustomSelector:
    return CustomSelector(parse({"path": f"{TEMPLATE}:DomainRoundRobinSelector", "params": params}))


DOMAINS = [0, 0, 0, 1, 1, 2, 2, 2, 2]  # a: 0-2, b: 3-4, c: 5-8
NAMES = ("a", "b", "c")


def test_template_takes_equal_shares_and_continues_across_updates() -> None:
    selector = template({"domains": ["a", "c"]})
    first = selector.select(select_context(num_samples=5, domains=DOMAINS, names=NAMES, update=0))
    # a gets ceil(5/2) = 3 (all of it), c gets 2 of its 4
    assert sorted(first[:3].tolist()) == [0, 1, 2] and set(first[3:].tolist()) <= {5, 6, 7, 8}
    second = selector.select(select_context(num_samples=5, domains=DOMAINS, names=NAMES, update=1))
    assert second[:3].tolist() == first[:3].tolist()  # a wrapped around its fixed order
    assert sorted([*first[3:].tolist(), *second[3:].tolist()]) == [5, 6, 7, 8]  # c continued, no repeat
    state = selector.state_dict()
    assert state["cursors"] == [0, 0]
    fresh = template({"domains": ["a", "c"]})
    fresh.load_state_dict(state)
    ctx_a, ctx_b = (select_context(num_samples=5, domains=DOMAINS, names=NAMES, update=2) for _ in "ab")
    assert torch.equal(fresh.select(ctx_a), selector.select(ctx_b))


def test_template_all_domains_and_errors() -> None:
    chosen = template({}).select(select_context(num_samples=6, domains=DOMAINS, names=NAMES))
    assert torch.bincount(torch.tensor(DOMAINS)[chosen], minlength=3).tolist() == [2, 2, 2]
    assert template({}).needs_model is False
    with pytest.raises(ConfigError, match="domains: unknown \\['z'\\]"):
        template({"domains": ["z"]}).select(select_context(num_samples=2, domains=DOMAINS, names=NAMES))
    with pytest.raises(ConfigError, match="domains: give at least one"):
        template({"domains": []})
