"""Every attack splittune ships, registered on import (one module per attack), in the order the docs present them."""

from . import inversion, optimization, gradient_labels, label_inference, aggregator  # noqa: F401

NAMES = ("inversion", "optimization", "gradient-labels", "label-inference", "aggregator")
