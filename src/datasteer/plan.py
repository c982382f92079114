"""The steering plan: the parsed configuration and its algorithms, built once.

The boundary (the CLI, or the Trainer mixin when given a mapping) parses the
``datasteer:`` block and builds the plan; everything below receives it and never parses
or builds again. The plan also refuses, before any model loads, the combinations of
stages that cannot be honoured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from datasteer.algorithm import Algorithm
from datasteer.capabilities import ComparesToReference
from datasteer.config import SteeringConfig, load_steering
from datasteer.errors import ConfigError
from datasteer.mixers.base import Mixer, ShapesDomainLoss
from datasteer.plugins import unwrap
from datasteer.registry import registry_for
from datasteer.selectors.base import Selector


@dataclass
class SteeringPlan:
    """A run's steering: its configuration and one built algorithm per stage.

    Attributes:
        config: the parsed ``datasteer:`` block.
        algorithms: paradigm -> algorithm, in composition order (mix, select, weight).
    """

    config: SteeringConfig
    algorithms: dict[str, Algorithm[Any]]

    @property
    def paradigms(self) -> tuple[str, ...]:
        return self.config.paradigms

    @property
    def mixer(self) -> Mixer | None:
        algorithm = self.algorithms.get("mix")
        return algorithm if isinstance(algorithm, Mixer) else None

    def reference_models(self) -> list[str]:
        """The reference models the stages compare the training losses to, in stage order."""
        algorithms = [unwrap(a) for a in self.algorithms.values()]
        return [a.reference_model() for a in algorithms if isinstance(a, ComparesToReference)]

    def reference_model(self) -> str | None:
        """Directory of the reference model a stage compares the training losses to, if any
        (:func:`build_plan` refuses two stages with different ones)."""
        paths = self.reference_models()
        return paths[0] if paths else None

    def needs_sample_losses(self) -> bool:
        """Whether a stage needs each training batch's per-sample losses (from the logits)."""
        from datasteer.drivers import DRIVERS

        return any(DRIVERS[p].uses_sample_losses(unwrap(a)) for p, a in self.algorithms.items())

    def check_domains(self, domain_names: Sequence[str]) -> None:
        """Validate the params that depend on the domains (e.g. proportions of the right length)."""
        if self.mixer is not None:
            self.mixer.check_domains(domain_names)

    def prepare_model(self, model: nn.Module) -> None:
        """Let each algorithm adjust the model once, before the optimizer is built."""
        for algorithm in self.algorithms.values():
            algorithm.prepare_model(model)


def build_plan(steering: SteeringConfig | Mapping[str, Any]) -> SteeringPlan:
    """Parse (if needed) and build the algorithms of a ``datasteer:`` block, once.

    Raises:
        ConfigError: a bad block, or stages that cannot be composed.
    """
    config = steering if isinstance(steering, SteeringConfig) else load_steering(steering)
    algorithms: dict[str, Algorithm[Any]] = {
        paradigm: registry_for(paradigm).build(stage.algorithm, stage.params)
        for paradigm, stage in config.stages.items()
    }
    plan = SteeringPlan(config, algorithms)
    mixer, selector = unwrap(plan.mixer), unwrap(algorithms.get("select"))
    if mixer is not None and isinstance(selector, Selector):
        selector.check_within_domains()
    if isinstance(mixer, ShapesDomainLoss) and "weight" in algorithms:
        raise ConfigError(
            f"datasteer.weight: {config.stages['mix'].algorithm} trains on its own domain-weighted loss; "
            "a weight stage would change its objective (drop one of the two)"
        )
    references = set(plan.reference_models())
    if len(references) > 1:
        raise ConfigError(
            f"reference_model: the stages name different reference models ({', '.join(sorted(references))}); "
            "a run loads one"
        )
    return plan
