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
from typing import ClassVar

import torch

from datasteer.plugins import Plugin, PluginParams, load_class
from datasteer.registry import SELECTORS
from datasteer.selectors.base import SelectContext, Selector


def load_selector_class(path: str) -> type[Selector]:
    """The Selector subclass named by ``path`` (``module:Class``, ``module.Class`` or ``file.py:Class``).

    Raises:
        ConfigError: (naming the ``path`` key) on a malformed path, an import failure, a
            missing attribute, or a class that is not a Selector with a ``Params`` dataclass.
    """
    cls: type[Selector] = load_class(path, Selector)
    return cls


@dataclass
class CustomParams(PluginParams):
    """Parameters of :class:`CustomSelector`."""

    base: ClassVar[type] = Selector


@SELECTORS.register("custom")
class CustomSelector(Plugin, Selector):
    """A user's own Selector subclass, loaded from the module or file named by its path.

    The drivers run the user's instance itself; ``select``, ``check_within_domains``,
    ``check_streams``, ``reset_pool``, ``window_ratio``, ``prepare_model``, ``state_dict`` /
    ``load_state_dict`` and ``needs_model`` are delegated for callers that hold this
    wrapper. See ``examples/custom_selector.py``.
    """

    Params = CustomParams
    inner: Selector

    def check_within_domains(self) -> None:
        self.inner.check_within_domains()

    def check_streams(self) -> None:
        self.inner.check_streams()

    def reset_pool(self) -> None:
        self.inner.reset_pool()

    def window_ratio(self) -> float:
        return self.inner.window_ratio()

    def select(self, ctx: SelectContext) -> torch.Tensor:
        return self.inner.select(ctx)
