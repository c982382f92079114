"""Selectors: which pool samples the next steps train on. One file per algorithm."""

from datasteer.registry import import_all_modules
from datasteer.selectors.base import SelectContext, Selector

__all__ = ["SelectContext", "Selector"]

import_all_modules(__name__, __path__)
