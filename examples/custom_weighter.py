"""A template for your own weighter: a fixed loss weight per domain, averaging 1 over each batch.

Use it from a run config (``examples/weight_custom.yaml``)::

    datasteer:
      paradigm: weight
      algorithm: custom
      params:
        path: examples/custom_weighter.py:DomainWeighter    # or my_package.my_module:MyClass
        params: {weights: {arithmetic: 2.0, noise: 0.5}}    # this class's Params

Copy this file next to your project and change the three parts marked below. A weighter
is called at every micro-step after ``warmup_steps`` with a
:class:`~datasteer.weighters.base.WeightContext`: the data-parallel micro-batch (every
rank's samples of the micro-step), with each sample's detached token-mean loss, pool index
and domain id. It returns one non-negative weight per sample, and the step's loss is the
mean of weight x loss. A weighter that also needs pooled hidden states, a refresh from the
live model, or a reference model's losses inherits the capability classes of
:mod:`datasteer.weighters.base` and :mod:`datasteer.capabilities` (see
``datasteer/weighters/adapt.py``); the custom wrapper forwards them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError
from datasteer.weighters.base import WeightContext, Weighter


# 1. Parameters: a dataclass. Every field needs a default and help text (``doc``); the
#    config's ``params:`` block is parsed into it strictly (unknown keys and wrong types are
#    errors that name the key). Check values in ``__post_init__`` and raise ConfigError.
@dataclass
class DomainWeightParams:
    """Parameters of :class:`DomainWeighter`."""

    weights: dict[str, float] = doc(
        "Loss weight of each domain, by name; domains not listed weigh 1, and 0 drops a domain.",
        default_factory=dict,
    )

    def __post_init__(self) -> None:
        bad = {name: w for name, w in self.weights.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ConfigError(f"weights: each weight must be finite and >= 0, got {bad}")


# 2. The weighter: subclass Weighter, point ``Params`` at the dataclass, implement ``weigh``.
class DomainWeighter(Weighter):
    """Domain weights: each sample's loss weighs its domain's fixed weight, mean-normalised per batch.

    The raw weight of a sample is ``weights[its domain]`` (1 for an unlisted domain); the
    weights returned are the raw ones divided by their mean over the micro-batch, so they
    average 1 and only the ratios between domains matter (a batch whose samples all weigh
    0 gets weight 0 everywhere). With domains [prose, arithmetic, noise] and weights
    ``{arithmetic: 2, noise: 0.5}``, a batch of domains [0, 1, 1, 2] has raw weights
    [1, 2, 2, 0.5], mean 1.375, so weights [0.727, 1.455, 1.455, 0.364].
    """

    Params = DomainWeightParams
    # True if the weighter needs the live model (e.g. in ``prepare_model`` or a refresh).
    # This one only needs the domain ids.
    needs_model = False

    def weigh(self, ctx: WeightContext) -> torch.Tensor:
        per_domain = self._weight_per_domain(ctx.domain_names).to(ctx.losses.dtype)
        raw = per_domain[ctx.domains]
        mean = raw.mean()
        return raw / mean if mean > 0 else raw

    def _weight_per_domain(self, names: tuple[str, ...]) -> torch.Tensor:
        """The raw weight of each domain id of the run."""
        unknown = sorted(set(self.params.weights) - set(names))
        if unknown:
            raise ConfigError(f"weights: unknown domains {unknown}; this run's domains are {list(names)}")
        return torch.tensor([self.params.weights.get(name, 1.0) for name in names], dtype=torch.float64)

    # 3. State: everything kept across steps (moving averages, counters), as tensors and
    #    plain Python, so that a run resumed from a checkpoint continues exactly: implement
    #    ``state_dict`` / ``load_state_dict`` (``examples/custom_selector.py`` shows how).
    #    This weighter keeps none, so it inherits the base's (an empty state).
