"""Channels carry frames between parties, many in flight; parties never know which one they are on (contract 4)."""

from .base import Channel, RemoteError, Tap, Traffic
from .local import LocalChannel

__all__ = ["Channel", "RemoteError", "Tap", "Traffic", "LocalChannel"]
