"""Loading a user's own algorithm class from a path given in a config.

A path is ``package.module:ClassName``, ``package.module.ClassName`` or
``path/to/file.py:ClassName`` (relative to the working directory). The ``custom``
algorithms (:mod:`datasteer.selectors.custom`, :mod:`datasteer.weighters.custom`) are
:class:`Plugin` wrappers whose :class:`PluginParams` call :func:`load_class` when they are
parsed, so every problem is a :class:`~datasteer.errors.ConfigError` naming the ``path``
key, before any model loads. The drivers run the user's instance itself
(:func:`unwrap`), so it keeps every capability class it inherits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from datasteer.algorithm import Algorithm
from datasteer.config import doc, parse_dataclass
from datasteer.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn


def _import_file(file: str) -> ModuleType:
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"path: no such file {file!r} (relative paths start at {Path.cwd()})")
    resolved = path.resolve()
    # One module per file, named after its location, so parsing a config twice reuses it
    # and two files with the same name do not collide.
    name = f"datasteer_user_{resolved.stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"path: cannot load {file!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look the module up by name while it runs
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ConfigError(f"path: importing {file!r} failed ({type(err).__name__}: {err})") from err
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as err:
        raise ConfigError(f"path: cannot import module {name!r} ({type(err).__name__}: {err})") from err


def load_class(path: str, base: type) -> type:
    """The subclass of ``base`` named by ``path`` (``module:Class``, ``module.Class`` or ``file.py:Class``).

    Args:
        path: where the class is; a ``.py`` file is imported by its location, a module by name.
        base: the class it must subclass (e.g. :class:`~datasteer.weighters.base.Weighter`).

    Returns:
        The class, which also has a ``Params`` dataclass attribute.

    Raises:
        ConfigError: (naming the ``path`` key) on a malformed path, an import failure, a
            missing attribute, or a class that is not a ``base`` with a ``Params`` dataclass.
    """
    where, sep, name = path.rpartition(":")
    if not sep:
        where, _, name = path.rpartition(".")
    if not where or not name.isidentifier():
        raise ConfigError(
            f"path: {path!r} is not 'package.module:ClassName', 'package.module.ClassName' or 'file.py:ClassName'"
        )
    module = _import_file(where) if where.endswith(".py") else _import_module(where)
    cls = getattr(module, name, None)
    if cls is None:
        raise ConfigError(f"path: {where!r} has no attribute {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"path: {path!r} is not a subclass of {base.__module__}.{base.__qualname__}")
    params_cls = getattr(cls, "Params", None)
    if not (isinstance(params_cls, type) and dataclasses.is_dataclass(params_cls)):
        raise ConfigError(f"path: {path!r} needs a `Params` dataclass attribute (an empty one if it has no params)")
    return cls


@dataclass
class PluginParams:
    """Parameters of a ``custom`` algorithm: where the user's class is, and its params."""

    #: The class the loaded class must subclass (set by each ``custom`` algorithm).
    base: ClassVar[type] = Algorithm

    path: str = doc(
        "The class: 'package.module:ClassName', 'package.module.ClassName' or "
        "'path/to/file.py:ClassName' (relative to the working directory)."
    )
    params: dict[str, Any] = doc("Parameters of that class's own Params dataclass.", default_factory=dict)

    def __post_init__(self) -> None:
        # Resolved here (plain attributes, not config fields), so a bad path or bad params
        # fail when the config is parsed, before any model loads.
        self.cls: type[Algorithm[Any]] = load_class(self.path, self.base)
        self.cls_params: Any = parse_dataclass(self.cls.Params, self.params, "params")


class Plugin(Algorithm[Any]):
    """A ``custom`` algorithm: holds the user's instance (``inner``), built from its params.

    The drivers :func:`unwrap` it and run ``inner`` directly; the delegating methods here
    serve callers that hold the wrapper (the plan, tests).
    """

    def __init__(self, params: PluginParams) -> None:
        super().__init__(params)
        self.inner: Algorithm[Any] = params.cls(params.cls_params)

    # The base class declares a class-level flag; here it follows the wrapped instance, so it
    # is a read-only property (mypy objects to a property replacing a writeable attribute).
    @property
    def needs_model(self) -> bool:  # type: ignore[override]
        """Whether the user's algorithm needs the live model."""
        return bool(self.inner.needs_model)

    def prepare_model(self, model: nn.Module) -> None:
        self.inner.prepare_model(model)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def unwrap(algorithm: Any) -> Any:
    """The algorithm that does the work: a :class:`Plugin`'s user instance, or ``algorithm``."""
    return algorithm.inner if isinstance(algorithm, Plugin) else algorithm
