"""Parties: the client (data, bottom and top segments) and the server (trunk)."""

from .client import Client
from .party import Party, SessionSpec
from .server import Server

__all__ = ["Client", "Party", "SessionSpec", "Server"]
