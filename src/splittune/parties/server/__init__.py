"""The server's end: the protocol handler (``handler``: validation, sessions, rejoin, turns) and the trunk engine
(``engine``) it hands computations to, the clients it serves (``group``, ``meet``: turns and meeting points), the
activations that arrive from the cache (``arrivals``) and generation sessions beside training (``inference``)."""

from .handler import Server

__all__ = ["Server"]
