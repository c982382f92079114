"""A user's own weighter, loaded from the user's module by a path given in the config.

    datasteer:
      paradigm: weight
      algorithm: custom
      params:
        path: my_project.weighters:MyWeighter     # or my_project.weighters.MyWeighter,
                                                  # or path/to/file.py:MyWeighter (relative to the cwd)
        params: {my_key: 3}                       # MyWeighter.Params, parsed strictly

The class must subclass :class:`datasteer.weighters.base.Weighter` and have a ``Params``
dataclass; ``examples/custom_weighter.py`` is a documented template. Everything is checked
when the config is parsed (before any model loads): the path, the import, the class and
its params (unknown keys are errors, as for built-in algorithms).

The user's class may also inherit the optional capability classes
(:class:`~datasteer.weighters.base.UsesBatchEmbeddings`,
:class:`~datasteer.weighters.base.RefreshesFromModel`,
:class:`~datasteer.capabilities.ComparesToReference`): the driver runs the user's
instance itself (:func:`datasteer.plugins.unwrap`), so it sees them as for a built-in
weighter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from datasteer.plugins import Plugin, PluginParams
from datasteer.registry import WEIGHTERS
from datasteer.weighters.base import WeightContext, Weighter


@dataclass
class CustomWeightParams(PluginParams):
    """Parameters of :class:`CustomWeighter`."""

    base: ClassVar[type] = Weighter


@WEIGHTERS.register("custom")
class CustomWeighter(Plugin, Weighter):
    """A user's own Weighter subclass, loaded from the module or file named by its path.

    The drivers run the user's instance itself (with every capability class it inherits);
    ``weigh``, ``prepare_model``, ``state_dict`` / ``load_state_dict`` and ``needs_model`` are
    delegated for callers that hold this wrapper. See ``examples/custom_weighter.py``.
    """

    Params = CustomWeightParams
    inner: Weighter

    def weigh(self, ctx: WeightContext) -> torch.Tensor:
        return self.inner.weigh(ctx)
