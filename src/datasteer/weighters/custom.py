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
:class:`~datasteer.capabilities.ComparesToReference`). The driver finds those with
``isinstance``, so the wrapper is then an instance of a subclass of :class:`CustomWeighter`
that inherits exactly the same capabilities and forwards their methods.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from datasteer.capabilities import ComparesToReference
from datasteer.config import doc, parse_dataclass
from datasteer.ops.embeddings import Pooling
from datasteer.ops.protocol import ModelOperations
from datasteer.plugins import load_class
from datasteer.registry import WEIGHTERS
from datasteer.weighters.base import RefreshesFromModel, UsesBatchEmbeddings, WeightContext, Weighter

if TYPE_CHECKING:
    from torch import nn


class _ForwardsBatchEmbeddings(UsesBatchEmbeddings):
    inner: Weighter

    def embedding_layer(self) -> tuple[int, Pooling]:
        return cast(UsesBatchEmbeddings, self.inner).embedding_layer()


class _ForwardsRefresh(RefreshesFromModel):
    inner: Weighter

    def refresh_every(self) -> int:
        return cast(RefreshesFromModel, self.inner).refresh_every()

    def refresh(self, ops: ModelOperations) -> dict[str, Any]:
        return cast(RefreshesFromModel, self.inner).refresh(ops)


class _ForwardsReference(ComparesToReference):
    inner: Weighter

    def reference_model(self) -> str:
        return cast(ComparesToReference, self.inner).reference_model()


#: Capability class -> the mixin that forwards it to the wrapped weighter. A new capability
#: class needs an entry here (tests/weighters/test_custom.py checks that every one has one).
FORWARDERS: dict[type, type] = {
    UsesBatchEmbeddings: _ForwardsBatchEmbeddings,
    RefreshesFromModel: _ForwardsRefresh,
    ComparesToReference: _ForwardsReference,
}


@dataclass
class CustomWeightParams:
    """Parameters of :class:`CustomWeighter`."""

    path: str = doc(
        "The weighter class: 'package.module:ClassName', 'package.module.ClassName' or "
        "'path/to/file.py:ClassName' (relative to the working directory)."
    )
    params: dict[str, Any] = doc("Parameters of that class's own Params dataclass.", default_factory=dict)

    def __post_init__(self) -> None:
        # Resolved here (plain attributes, not config fields), so a bad path or bad params
        # fail when the config is parsed, before any model loads.
        self.weighter_cls: type[Weighter] = load_class(self.path, Weighter)
        self.weighter_params: Any = parse_dataclass(self.weighter_cls.Params, self.params, "params")
        self.capabilities: tuple[type, ...] = tuple(c for c in FORWARDERS if issubclass(self.weighter_cls, c))


@WEIGHTERS.register("custom")
class CustomWeighter(Weighter):
    """A user's own Weighter subclass, loaded from the module or file named by its path.

    Every call is delegated: ``weigh``, ``prepare_model``, ``state_dict`` /
    ``load_state_dict``, ``needs_model`` and the methods of any capability class the user's
    class inherits (the instance then inherits it too). See ``examples/custom_weighter.py``.
    """

    Params = CustomWeightParams

    def __new__(cls, params: CustomWeightParams | None = None) -> CustomWeighter:
        # The class is chosen here because the registry only calls CustomWeighter(params).
        # Without params (copy.deepcopy re-creating an instance) the class is already chosen.
        chosen = _with_capabilities(params.capabilities) if cls is CustomWeighter and params is not None else cls
        return cast(CustomWeighter, object.__new__(chosen))

    def __init__(self, params: CustomWeightParams) -> None:
        super().__init__(params)
        self.inner: Weighter = params.weighter_cls(params.weighter_params)

    # The base class declares a class-level flag; here it follows the wrapped instance, so it
    # is a read-only property (mypy objects to a property replacing a writeable attribute).
    @property
    def needs_model(self) -> bool:  # type: ignore[override]
        """Whether the user's weighter needs the live model."""
        return bool(self.inner.needs_model)

    def prepare_model(self, model: nn.Module) -> None:
        self.inner.prepare_model(model)

    def weigh(self, ctx: WeightContext) -> torch.Tensor:
        return self.inner.weigh(ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


@functools.cache
def _with_capabilities(capabilities: tuple[type, ...]) -> type[CustomWeighter]:
    """:class:`CustomWeighter`, or (once per combination) its subclass that also inherits
    ``capabilities`` through their forwarders."""
    if not capabilities:
        return CustomWeighter
    name = "+".join(["CustomWeighter", *(c.__name__ for c in capabilities)])
    bases = (CustomWeighter, *(FORWARDERS[c] for c in capabilities))
    return cast(type[CustomWeighter], types.new_class(name, bases, exec_body=lambda ns: ns.update(__module__=__name__)))
