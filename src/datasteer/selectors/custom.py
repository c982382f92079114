"""A user's own selector, loaded from the user's module by a path given in the config.

    datasteer:
      paradigm: select
      algorithm: custom
      params:
        path: my_project.selectors:MySelector     # or my_project.selectors.MySelector,
                                                  # or path/to/file.py:MySelector (relative to the cwd)
        params: {my_key: 3}                       # MySelector.Params, parsed strictly

The class must subclass :class:`datasteer.selectors.base.Selector` and have a ``Params``
dataclass; ``examples/custom_selector.py`` is a documented template. Everything is checked
when the config is parsed (before any model loads): the path, the import, the class and
its params (unknown keys are errors, as for built-in algorithms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from datasteer.config import doc, parse_dataclass
from datasteer.plugins import load_class
from datasteer.registry import SELECTORS
from datasteer.selectors.base import SelectContext, Selector

if TYPE_CHECKING:
    from torch import nn


def load_selector_class(path: str) -> type[Selector]:
    """The Selector subclass named by ``path`` (``module:Class``, ``module.Class`` or ``file.py:Class``).

    Raises:
        ConfigError: (naming the ``path`` key) on a malformed path, an import failure, a
            missing attribute, or a class that is not a Selector with a ``Params`` dataclass.
    """
    cls: type[Selector] = load_class(path, Selector)
    return cls


@dataclass
class CustomParams:
    """Parameters of :class:`CustomSelector`."""

    path: str = doc(
        "The selector class: 'package.module:ClassName', 'package.module.ClassName' or "
        "'path/to/file.py:ClassName' (relative to the working directory)."
    )
    params: dict[str, Any] = doc("Parameters of that class's own Params dataclass.", default_factory=dict)

    def __post_init__(self) -> None:
        # Resolved here (plain attributes, not config fields), so a bad path or bad params
        # fail when the config is parsed, before any model loads.
        self.selector_cls: type[Selector] = load_selector_class(self.path)
        self.selector_params: Any = parse_dataclass(self.selector_cls.Params, self.params, "params")


@SELECTORS.register("custom")
class CustomSelector(Selector):
    """A user's own Selector subclass, loaded from the module or file named by its path.

    Every call is delegated: ``select``, ``prepare_model``, ``check_within_domains``, ``state_dict`` /
    ``load_state_dict`` and ``needs_model`` (the controller builds model operations only
    when the user's class asks for them). See ``examples/custom_selector.py``.
    """

    Params = CustomParams

    def __init__(self, params: CustomParams) -> None:
        super().__init__(params)
        self.inner: Selector = params.selector_cls(params.selector_params)

    # The base class declares a class-level flag; here it follows the wrapped instance, so it
    # is a read-only property (mypy objects to a property replacing a writeable attribute).
    @property
    def needs_model(self) -> bool:  # type: ignore[override]
        """Whether the user's selector needs the live model."""
        return bool(self.inner.needs_model)

    def prepare_model(self, model: nn.Module) -> None:
        self.inner.prepare_model(model)

    def check_within_domains(self) -> None:
        self.inner.check_within_domains()

    def select(self, ctx: SelectContext) -> torch.Tensor:
        return self.inner.select(ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
