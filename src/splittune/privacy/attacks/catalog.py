"""Every attack splittune ships, registered on import (one module per attack)."""

from . import inversion, optimization, gradient_labels, label_inference, aggregator  # noqa: F401
