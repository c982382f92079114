"""The custom weighter: loading by path, config-time errors, delegation, capabilities, and the shipped template."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from datasteer.config import load_steering, parse_dataclass
from datasteer.errors import ConfigError
from datasteer.plugins import load_class
from datasteer.registry import WEIGHTERS
from datasteer.weighters.base import Weighter
from datasteer.weighters.custom import CustomWeighter, CustomWeightParams
from datasteer.weighters.uniform import UniformWeighter
from tests.factories import user_module_dir, weight_context

TEMPLATE = Path(__file__).resolve().parents[2] / "examples" / "custom_weighter.py"

USER_MODULE = '''
from dataclasses import dataclass
from typing import Any

import torch

from datasteer.capabilities import ComparesToReference
from datasteer.config import doc
from datasteer.errors import ConfigError
from datasteer.weighters.base import RefreshesFromModel, UsesBatchEmbeddings, Weighter


@dataclass
class ScaleParams:
    factor: float = doc("Every weight.", default=1.0)

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ConfigError(f"factor: must be > 0, got {self.factor}")


class ScaleWeighter(Weighter):
    """Weight `factor` for every sample; counts its calls."""

    Params = ScaleParams
    needs_model = True

    def __init__(self, params: ScaleParams) -> None:
        super().__init__(params)
        self.calls = 0
        self.prepared = None

    def prepare_model(self, model: Any) -> None:
        self.prepared = model

    def weigh(self, ctx: Any) -> torch.Tensor:
        self.calls += 1
        return torch.full_like(ctx.losses, self.params.factor)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]


class CapableWeighter(ScaleWeighter, UsesBatchEmbeddings, RefreshesFromModel, ComparesToReference):
    """Every capability, each answering with a recognisable value."""

    def embedding_layer(self) -> tuple[int, str]:
        return 3, "mean"

    def refresh_every(self) -> int:
        return 7

    def refresh(self, ops: Any) -> dict[str, Any]:
        return {"ops": ops}

    def reference_model(self) -> str:
        return "outputs/reference"


class EmbeddingsOnly(ScaleWeighter, UsesBatchEmbeddings):
    """One capability."""

    def embedding_layer(self) -> tuple[int, str]:
        return -1, "last"


class NoParams(Weighter):
    """A weighter without Params."""

    def weigh(self, ctx: Any) -> torch.Tensor:
        return torch.ones_like(ctx.losses)


class NotAWeighter:
    Params = ScaleParams
'''


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with ``user_weigh_mod.py`` (also importable as a module) and a broken file."""
    return user_module_dir(tmp_path, monkeypatch, "user_weigh_mod", USER_MODULE)


def parse(raw: dict) -> CustomWeightParams:
    return parse_dataclass(CustomWeightParams, raw, "datasteer.params")


@pytest.mark.parametrize(
    "path", ["user_weigh_mod:ScaleWeighter", "user_weigh_mod.ScaleWeighter", "user_weigh_mod.py:ScaleWeighter"]
)
def test_loads_by_module_dotted_or_file_path(user_dir: Path, path: str) -> None:
    weighter = WEIGHTERS.build("custom", parse({"path": path, "params": {"factor": 2.5}}))
    assert isinstance(weighter, CustomWeighter) and type(weighter.inner).__name__ == "ScaleWeighter"
    assert weighter.weigh(weight_context(torch.tensor([0.1, 0.2, 0.3]))).tolist() == [2.5, 2.5, 2.5]


def test_builtin_class_by_dotted_path() -> None:
    assert load_class("datasteer.weighters.uniform:UniformWeighter", Weighter) is UniformWeighter
    assert load_class("datasteer.weighters.uniform.UniformWeighter", Weighter) is UniformWeighter


def test_delegates_weigh_state_needs_model_and_prepare_model(user_dir: Path) -> None:
    weighter = CustomWeighter(parse({"path": "user_weigh_mod.py:ScaleWeighter"}))
    assert weighter.needs_model is True  # the user's class asks for the model
    weighter.weigh(weight_context(torch.tensor([1.0])))
    weighter.weigh(weight_context(torch.tensor([1.0])))
    assert weighter.state_dict() == {"calls": 2}
    fresh = CustomWeighter(parse({"path": "user_weigh_mod.py:ScaleWeighter"}))
    fresh.load_state_dict(weighter.state_dict())
    assert fresh.state_dict() == {"calls": 2}
    model = torch.nn.Linear(1, 1)
    fresh.prepare_model(model)
    assert fresh.inner.prepared is model  # type: ignore[attr-defined]
    uniform = CustomWeighter(parse({"path": "datasteer.weighters.uniform:UniformWeighter"}))
    assert uniform.needs_model is False
    with pytest.raises(ValueError, match="UniformWeighter keeps no state"):
        uniform.load_state_dict({"calls": 1})


def test_the_driver_runs_the_users_instance_with_its_capabilities(user_dir: Path) -> None:
    import numpy as np

    from datasteer.controller import SteeringController
    from datasteer.plan import build_plan

    def controller(cls: str) -> SteeringController:
        plan = build_plan({"paradigm": "weight", "algorithm": "custom", "params": {"path": f"user_weigh_mod:{cls}"}})
        return SteeringController(plan, domains=np.zeros(4, int), domain_names=("x",), global_batch=2, seed=0, lag=1)

    capable = controller("CapableWeighter")
    (driver,) = capable.drivers
    assert type(driver.algorithm).__name__ == "CapableWeighter"  # unwrapped: no forwarding layer
    assert capable.embedding_layer == (3, "mean") and capable.reference_model == "outputs/reference"
    assert capable.plan.reference_model() == "outputs/reference"
    plain = controller("ScaleWeighter")
    assert plain.embedding_layer is None and plain.reference_model is None
    assert copy.deepcopy(plain.plan.algorithms["weight"]).inner.params.factor == 1.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"path": "NoColonOrDot"}, "datasteer.params.path: 'NoColonOrDot' is not 'package.module:ClassName'"),
        ({"path": "no_such_module_xyz:Thing"}, "path: cannot import module 'no_such_module_xyz' (ModuleNotFoundError"),
        ({"path": "missing.py:Thing"}, "datasteer.params.path: no such file 'missing.py'"),
        ({"path": "broken.py:Thing"}, "path: importing 'broken.py' failed (RuntimeError: boom)"),
        ({"path": "user_weigh_mod:Nope"}, "path: 'user_weigh_mod' has no attribute 'Nope'"),
        ({"path": "user_weigh_mod.py:Nope"}, "path: 'user_weigh_mod.py' has no attribute 'Nope'"),
        ({"path": "user_weigh_mod:NotAWeighter"}, "is not a subclass of datasteer.weighters.base.Weighter"),
        (
            {"path": "datasteer.selectors.random:RandomSelector"},
            "is not a subclass of datasteer.weighters.base.Weighter",
        ),
        ({"path": "user_weigh_mod:NoParams"}, "needs a `Params` dataclass"),
        (
            {"path": "user_weigh_mod:ScaleWeighter", "params": {"factr": 1}},
            "datasteer.params.params.factr: unknown key",
        ),
        ({"path": "user_weigh_mod:ScaleWeighter", "params": {"factor": -1}}, "params.factor: must be > 0"),
        ({"path": "user_weigh_mod:ScaleWeighter", "params": {"factor": "a"}}, "params.factor: expected a number"),
        ({"params": {}}, "datasteer.params.path: required key is missing"),
    ],
)
def test_errors_at_config_parse_time(user_dir: Path, raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_steering({"paradigm": "weight", "algorithm": "custom", "params": raw})
    assert message in str(err.value)


# -- the shipped template ---------------------------------------------------------------------


def template(weights: dict[str, float]) -> CustomWeighter:
    return CustomWeighter(parse({"path": f"{TEMPLATE}:DomainWeighter", "params": {"weights": weights}}))


NAMES = ("prose", "arithmetic", "noise")


def test_template_weighs_each_domain_mean_normalised() -> None:
    weighter = template({"arithmetic": 2.0, "noise": 0.5})
    assert weighter.needs_model is False and weighter.state_dict() == {}
    weights = weighter.weigh(
        weight_context(torch.tensor([3.0, 1.0, 2.0, 5.0]), domains=torch.tensor([0, 1, 1, 2]), names=NAMES)
    )
    # raw [1, 2, 2, 0.5] (prose unlisted: 1), mean 1.375
    expected = torch.tensor([1 / 1.375, 2 / 1.375, 2 / 1.375, 0.5 / 1.375])
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights, torch.tensor([0.72727273, 1.45454545, 1.45454545, 0.36363636]))
    assert float(weights.mean()) == pytest.approx(1.0)


def test_template_zero_weights_and_errors() -> None:
    dropped = template({"noise": 0.0}).weigh(
        weight_context(torch.tensor([1.0, 1.0, 1.0]), domains=torch.tensor([2, 2, 0]), names=NAMES)
    )
    torch.testing.assert_close(dropped, torch.tensor([0.0, 0.0, 3.0]))
    only_noise = template({"noise": 0.0}).weigh(
        weight_context(torch.tensor([1.0, 1.0]), domains=torch.tensor([2, 2]), names=NAMES)
    )
    assert only_noise.tolist() == [0.0, 0.0]  # nothing to normalise by: the batch weighs 0
    with pytest.raises(ConfigError, match=r"weights: unknown domains \['code'\]"):
        template({"code": 2.0}).weigh(weight_context(torch.tensor([1.0]), domains=torch.tensor([0]), names=NAMES))
    with pytest.raises(ConfigError, match=r"params\.weights: each weight must be finite and >= 0"):
        template({"noise": -1.0})
