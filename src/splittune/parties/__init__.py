"""Parties: the client (data, bottom and top segments) and the server (trunk)."""

from .client.pipeline import Client
from .party import Party, SessionSpec
from .server.handler import Server

__all__ = ["Client", "Party", "SessionSpec", "Server"]
