"""The base every algorithm shares: its parsed params and a state round-trip.

Algorithms are pure: a typed context in, indices / proportions / weights out. Anything
an algorithm keeps across updates (moving averages, histories) goes through
``state_dict`` / ``load_state_dict`` so that a resumed run continues exactly.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch

from datasteer.ops.protocol import NO_MODEL, ModelOperations

if TYPE_CHECKING:
    from torch import nn

P = TypeVar("P")


@dataclass(frozen=True, kw_only=True)
class UpdateContext:
    """What every update (a selection or new proportions) may look at.

    Attributes:
        step: optimizer steps the model has completed when the update is made.
        first_step: first step (1-based) the update shapes.
        last_step: last step it shapes before the next update (``max_steps`` if none).
        max_steps: total optimizer steps of the run.
        update: index of this update (0 for the first; -1 for a mixer's initial proportions).
        domain_names: names of the domain ids.
        generator: the only source of randomness, seeded from (seed, update).
        ops: model operations bound to the live model; :data:`~datasteer.ops.protocol.NO_MODEL`
            (every use an error) unless the algorithm sets ``needs_model``.
    """

    step: int
    first_step: int
    last_step: int
    max_steps: int
    update: int
    domain_names: tuple[str, ...]
    generator: torch.Generator
    ops: ModelOperations = NO_MODEL


class Algorithm(ABC, Generic[P]):
    """Base class of selectors, mixers and weighters, generic in its params dataclass.

    A subclass declares ``Params`` (the dataclass the registry parses its YAML ``params:``
    into) and implements its paradigm's one abstract method.
    """

    Params: ClassVar[type]
    #: Whether the algorithm needs the live model (its contexts then carry model operations).
    needs_model: ClassVar[bool] = False

    def __init__(self, params: P) -> None:
        self.params: P = params

    def prepare_model(self, model: nn.Module) -> None:
        """Adjust the model once, before the optimizer is built (e.g. freeze parameters).

        Called by the integrations when the trainer is created. Default: nothing.
        """

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a resume; tensors and plain Python only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")
