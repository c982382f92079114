"""The base every algorithm shares: its parsed params and a state round-trip.

Algorithms are pure: a typed context in, indices / proportions / weights out. Anything
an algorithm keeps across updates (moving averages, histories) goes through
``state_dict`` / ``load_state_dict`` so that a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar


class Algorithm:
    """Base class of selectors, mixers and weighters."""

    Params: ClassVar[type]
    #: Whether the algorithm needs the live model (the controller then builds model ops).
    needs_model: ClassVar[bool] = False

    def __init__(self, params: Any) -> None:
        self.params = params

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a resume; tensors and plain Python only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")
