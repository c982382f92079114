"""When a stage acts, in optimizer steps (1-based).

* steps ``1 .. warmup_steps`` train on the warm-up plan;
* update ``u`` (0, 1, ...) shapes steps ``warmup_steps + u * update_every + 1`` onwards,
  for ``update_every`` steps (the last update, if ``max_updates`` is reached, stays in
  force to the end);
* the data loader prefetches, so an update is **decided** ``lag`` steps before the first
  step it shapes, after step ``first_step - 1 - lag`` (at train begin if that is <= 0).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """When updates happen (see the module docstring)."""

    warmup_steps: int
    update_every: int
    max_updates: int | None
    lag: int

    def first_step(self, update: int) -> int:
        """First step shaped by ``update``."""
        return self.warmup_steps + update * self.update_every + 1

    def last_step(self, update: int, max_steps: int) -> int:
        """Last step shaped by ``update`` before the next one (or the end)."""
        if self.max_updates is not None and update + 1 >= self.max_updates:
            return max_steps
        return min(self.first_step(update + 1) - 1, max_steps)

    def decided_at(self, update: int) -> int:
        """Step after which ``update`` is computed (0: at train begin)."""
        return max(0, self.first_step(update) - 1 - self.lag)

    def total_updates(self, max_steps: int) -> int:
        """How many updates a run of ``max_steps`` steps makes."""
        possible = max(0, -(-(max_steps - self.warmup_steps) // self.update_every))
        return possible if self.max_updates is None else min(possible, self.max_updates)

    def updates_decided_at(self, step: int, max_steps: int) -> list[int]:
        """The updates to compute after ``step`` (0: at train begin), in order."""
        result = []
        update = 0
        while self.max_updates is None or update < self.max_updates:
            if self.first_step(update) > max_steps or self.decided_at(update) > step:
                break
            if self.decided_at(update) == step:
                result.append(update)
            update += 1
        return result
