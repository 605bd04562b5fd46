"""The channel seam: request/reply of messages, bytes counted once per frame, taps for observers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

from ..wire import Message, decode_frame, encode_frame

# A tap sees exactly what one observer sees: direction ("up": client → server, "down"), the decoded
# message and its frame size. Attacks read taps, never party internals (DESIGN.md contract 6).
Tap = Callable[[str, Message, int], None]


class RemoteError(RuntimeError):
    """The other party refused a message; the text is its reason, ``code`` its gRPC status name."""

    def __init__(self, reason: str, code: str = "UNKNOWN"):
        super().__init__(reason)
        self.code = code


class Channel(ABC):
    def __init__(self, codecs_up: dict[str, str] | None = None, codecs_down: dict[str, str] | None = None):
        self.bytes_up = 0
        self.bytes_down = 0
        self.messages_up = 0
        self.messages_down = 0
        self.codecs_up = codecs_up or {}
        self.codecs_down = codecs_down or {}
        self.taps: list[Tap] = []

    def add_tap(self, tap: Tap) -> None:
        self.taps.append(tap)

    def _observe(self, direction: str, msg: Message, nbytes: int) -> None:
        if direction == "up":
            self.bytes_up += nbytes
            self.messages_up += 1
        else:
            self.bytes_down += nbytes
            self.messages_down += 1
        for tap in self.taps:
            tap(direction, msg, nbytes)

    def encode_up(self, msg: Message) -> bytes:
        return encode_frame(msg, self.codecs_up)

    def receive_down(self, frame: bytes) -> Message:
        reply = decode_frame(frame)
        self._observe("down", reply, len(frame))
        if reply.kind == "error":
            raise RemoteError(reply.meta.get("reason", "the server refused the message"), reply.meta.get("code", "UNKNOWN"))
        return reply

    @abstractmethod
    def call(self, msg: Message) -> Message:
        """Send ``msg`` to the server and return its reply."""

    def close(self) -> None:
        pass
