"""The version, a leaf every part may read."""

__version__ = "0.1.0"
