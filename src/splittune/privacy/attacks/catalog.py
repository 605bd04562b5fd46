"""Every attack splittune ships, registered on import (one module per attack), in the order the docs present them,
and ``make_attack``, which builds one by name."""

from typing import Any

from . import aggregator, generation, gradient_labels, inversion, label_inference, optimization  # noqa: F401  (each registers itself)
from .base import REGISTRY, Attack, AttackError

NAMES = ("inversion", "optimization", "generation-inversion", "gradient-labels", "label-inference", "aggregator")


def make_attack(name: str, options: dict[str, Any] | None = None) -> Attack:
    """The attack registered as ``name``, with ``options`` (an unknown name or option is an ``AttackError``)."""
    if name not in REGISTRY:
        raise AttackError(f"unknown attack {name!r}; attacks: {', '.join(NAMES)}")
    return REGISTRY[name](options)
