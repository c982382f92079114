"""Loading a user's own algorithm class from a path given in a config.

A path is ``package.module:ClassName``, ``package.module.ClassName`` or
``path/to/file.py:ClassName`` (relative to the working directory). The ``custom``
algorithms (:mod:`datasteer.selectors.custom`, :mod:`datasteer.weighters.custom`) call
:func:`load_class` when their params are parsed, so every problem is a
:class:`~datasteer.errors.ConfigError` naming the ``path`` key, before any model loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from datasteer.errors import ConfigError


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
