"""The one error type of the data module."""

from __future__ import annotations

from ..errors import SplittuneError



class DataError(SplittuneError, ValueError):
    """Data that cannot be used; the message names the file (and line) and what is allowed there."""
