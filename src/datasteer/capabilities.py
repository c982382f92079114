"""Optional needs an algorithm declares by also inheriting a small capability class.

The driver of its paradigm asks for them; nothing else in the core knows the algorithm.
Paradigm-specific capabilities live beside their base (:mod:`datasteer.mixers.base`,
:mod:`datasteer.weighters.base`); the ones here serve any paradigm.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class ComparesToReference(ABC):
    """Capability: needs a frozen reference model's losses.

    The training integration loads the reference model once. For a mixer or a weighter it
    runs the model on each training micro-batch (one no-grad forward) and hands its
    per-token losses to the stage (a mixer's ``DomainStats.excess_sum``, a weighter's
    ``WeightContext.reference_losses``). A selector asks for pool samples' losses itself,
    when it selects (:meth:`~datasteer.ops.protocol.ModelOperations.reference_losses`); no
    training batch is run through the reference model for it.
    """

    @abstractmethod
    def reference_model(self) -> str:
        """Directory of the reference model."""
