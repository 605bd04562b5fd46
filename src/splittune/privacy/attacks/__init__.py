"""Attacks on recorded taps (``base.py``: the interface, the registry and ``run_attack``; ``catalog.py`` lists them)."""

from .base import REGISTRY, Attack, AttackError, Recovered, Recovery, run_attack
from .catalog import make_attack

__all__ = ["REGISTRY", "Attack", "AttackError", "Recovered", "Recovery", "make_attack", "run_attack"]
