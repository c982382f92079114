"""Mixers: proportions over domains for the next steps. One file per algorithm."""

from datasteer.mixers.base import DomainStats, MixContext, Mixer, check_proportions
from datasteer.registry import import_all_modules

__all__ = ["DomainStats", "MixContext", "Mixer", "check_proportions"]

import_all_modules(__name__, __path__)
