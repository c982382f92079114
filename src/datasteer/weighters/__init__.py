"""Weighters: one loss weight per sample of every training batch. One file per algorithm."""

from datasteer.registry import import_all_modules
from datasteer.weighters.base import WeightContext, Weighter

__all__ = ["WeightContext", "Weighter"]

import_all_modules(__name__, __path__)
