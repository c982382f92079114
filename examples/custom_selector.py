"""A template for your own selector: equal shares of every domain, never repeating a sample early.

Use it from a run config (``examples/select_custom.yaml``)::

    datasteer:
      paradigm: select
      algorithm: custom
      params:
        path: examples/custom_selector.py:DomainRoundRobinSelector   # or my_package.my_module:MyClass
        params: {domains: [arithmetic, code]}                        # this class's Params

Copy this file next to your project and change the three parts marked below. A selector
is called at every update (after ``warmup_steps``, then every ``update_every`` steps) with
a :class:`~datasteer.selectors.base.SelectContext` and returns the pool indices that the
next ``update_every`` steps train on (the sampler serves them in a seeded shuffled order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from datasteer.config import doc
from datasteer.errors import ConfigError
from datasteer.selectors.base import SelectContext, Selector


# 1. Parameters: a dataclass. Every field needs a default and help text (``doc``); the
#    config's ``params:`` block is parsed into it strictly (unknown keys and wrong types are
#    errors that name the key). Check values in ``__post_init__`` and raise ConfigError.
@dataclass
class RoundRobinParams:
    """Parameters of :class:`DomainRoundRobinSelector`."""

    domains: list[str] | None = doc("Domains to draw from, by name (null: every domain).", default=None)

    def __post_init__(self) -> None:
        if self.domains is not None and not self.domains:
            raise ConfigError("domains: give at least one domain name, or null for all")


# 2. The selector: subclass Selector, point ``Params`` at the dataclass, implement ``select``.
class DomainRoundRobinSelector(Selector):
    """Domain round-robin: each update takes equal shares of the chosen domains.

    Each domain is walked along one seeded permutation that is fixed at the first update;
    every update continues where the previous one stopped, so a sample comes back only
    once its whole domain has been served. Shares differ by at most one sample.
    """

    Params = RoundRobinParams
    # True if ``select`` uses ``ctx.ops`` (losses, embeddings, gradients of the live model);
    # the controller then builds the model operations. This one only needs the domain ids.
    needs_model = False

    def __init__(self, params: RoundRobinParams) -> None:
        super().__init__(params)
        self.orders: list[torch.Tensor] = []  # per chosen domain: its pool indices, permuted
        self.cursors: list[int] = []  # per chosen domain: how far its order has been served

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if not self.orders:
            self.orders = [self._permuted_members(ctx, d) for d in self._domain_ids(ctx)]
            self.cursors = [0] * len(self.orders)
        # Split num_samples as evenly as possible; the first domains get the remainder.
        base, extra = divmod(ctx.num_samples, len(self.orders))
        taken = []
        for i, order in enumerate(self.orders):
            want = base + (1 if i < extra else 0)
            # Wrap around the domain's order when it runs out (modulo its size).
            positions = (self.cursors[i] + torch.arange(want)) % len(order)
            taken.append(order[positions])
            self.cursors[i] = (self.cursors[i] + want) % len(order)
        return torch.cat(taken)

    def _domain_ids(self, ctx: SelectContext) -> list[int]:
        names = list(ctx.domain_names)
        wanted = self.params.domains or names
        unknown = [d for d in wanted if d not in names]
        if unknown:
            raise ConfigError(f"domains: unknown {unknown}; this run's domains are {names}")
        ids = [names.index(d) for d in wanted if bool((ctx.domains == names.index(d)).any())]
        if not ids:
            raise ConfigError(f"domains: none of {wanted} has samples in the pool")
        return ids

    @staticmethod
    def _permuted_members(ctx: SelectContext, domain: int) -> torch.Tensor:
        members = torch.nonzero(ctx.domains == domain).flatten()
        # Randomness only from ctx.generator (seeded by run seed and update): never global RNG.
        return members[torch.randperm(len(members), generator=ctx.generator)]

    # 3. State: everything kept across updates, as tensors and plain Python, so that a run
    #    resumed from a checkpoint continues exactly. Stateless selectors can omit both.
    def state_dict(self) -> dict[str, Any]:
        return {"orders": self.orders, "cursors": self.cursors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.orders, self.cursors = list(state["orders"]), list(state["cursors"])
