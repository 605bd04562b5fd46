"""The defenses: one registered class per defense, one file each (``base.Defense``; ``gaussian.py`` is the model).

Importing the package imports every module in it, so a new file's ``@register`` is all it takes to reach the
config (its entry), the chain (a defense that ``crosses``), the client (``hooks.ClientDefenses``), the summary
(``guarantees``), ``splittune privacy`` (``sweep``) and the config reference.
"""

import importlib
import pkgutil

from .base import DEFENSES, Defense, DefenseError, Guarantee, Placement, Settings, Usage, defense, register, under
from .hooks import ClientDefenses, chain_entries, configured, guarantees
from .noise import NoiseStream, NoisyTransform

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DEFENSES", "Defense", "DefenseError", "Guarantee", "Placement", "Settings", "Usage", "defense", "register",
           "under", "ClientDefenses", "chain_entries", "configured", "guarantees", "NoiseStream", "NoisyTransform"]
