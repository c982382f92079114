"""One registry per paradigm, filled by a decorator in each algorithm's own file.

    @MIXERS.register("static")
    class StaticMixer(Mixer):
        '''Fixed proportions.'''
        Params = StaticParams

Adding an algorithm is one file in ``selectors/``, ``mixers/`` or ``weighters/``: the
package's ``__init__`` imports every module in its folder, so registration needs no list
to edit. Unknown names raise a :class:`ConfigError` listing the registered ones.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from datasteer.errors import ConfigError

A = TypeVar("A")


@dataclass(frozen=True)
class AlgorithmSpec:
    """What the registry knows of one algorithm."""

    paradigm: str
    name: str
    cls: type
    params_cls: type

    @property
    def summary(self) -> str:
        """First line of the class docstring."""
        text = inspect.getdoc(self.cls) or ""
        return text.strip().splitlines()[0] if text.strip() else ""


class Registry(Generic[A]):
    """Name -> algorithm class for one paradigm."""

    def __init__(self, paradigm: str, package: str) -> None:
        self.paradigm = paradigm
        self._package = package
        self._specs: dict[str, AlgorithmSpec] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[type[A]], type[A]]:
        """Class decorator registering an algorithm under its YAML name."""

        def decorate(cls: type[A]) -> type[A]:
            params_cls = getattr(cls, "Params", None)
            if not isinstance(params_cls, type) or not dataclasses.is_dataclass(params_cls):
                raise TypeError(f"{cls.__name__}: an algorithm needs a `Params` dataclass attribute")
            if name in self._specs and self._specs[name].cls is not cls:
                raise TypeError(f"{self.paradigm} algorithm {name!r} is registered twice")
            self._specs[name] = AlgorithmSpec(self.paradigm, name, cls, params_cls)
            return cls

        return decorate

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self._package)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._load()
        return sorted(self._specs)

    def __iter__(self) -> Iterator[AlgorithmSpec]:
        return iter(self.get(name) for name in self.names())

    def get(self, name: str, where: str = "datasteer.algorithm") -> AlgorithmSpec:
        """The spec of ``name``; a ConfigError naming the allowed names if unknown."""
        self._load()
        if name not in self._specs:
            allowed = ", ".join(sorted(self._specs))
            import difflib

            close = difflib.get_close_matches(name, list(self._specs), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown {self.paradigm} algorithm {name!r}{hint}; choose one of {allowed}")
        return self._specs[name]

    def build(self, name: str, params: Any) -> A:
        """Instantiate algorithm ``name`` with its parsed params."""
        spec = self.get(name)
        if not isinstance(params, spec.params_cls):
            raise TypeError(f"{name}: expected params of type {spec.params_cls.__name__}")
        instance: A = spec.cls(params)
        return instance


SELECTORS: Registry[Any] = Registry("select", "datasteer.selectors")
MIXERS: Registry[Any] = Registry("mix", "datasteer.mixers")
WEIGHTERS: Registry[Any] = Registry("weight", "datasteer.weighters")

_BY_PARADIGM = {"select": SELECTORS, "mix": MIXERS, "weight": WEIGHTERS}


def registry_for(paradigm: str) -> Registry[Any]:
    """The registry of a paradigm (``select``, ``mix`` or ``weight``)."""
    try:
        return _BY_PARADIGM[paradigm]
    except KeyError:
        raise ConfigError(
            f"datasteer.paradigm: unknown paradigm {paradigm!r}; choose one of select, mix, weight"
        ) from None


def import_all_modules(package_name: str, package_path: list[str]) -> None:
    """Import every module of a package folder (used by each algorithm folder's __init__)."""
    import pkgutil

    for info in pkgutil.iter_modules(package_path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
