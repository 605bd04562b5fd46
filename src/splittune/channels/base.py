"""The channel seam: frames to the server and replies back, many in flight, bytes counted once per frame."""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from ..errors import SplittuneError
from ..threads import enrolled
from ..wire import Message, decode_frame, encode_frame

# A tap sees exactly what one observer sees: direction ("up": client → server, "down"), the decoded
# message and its frame size. Attacks read taps, never party internals (DESIGN.md contract 6).
Tap = Callable[[str, Message, int], None]


class RemoteError(SplittuneError, RuntimeError):
    """The other party refused a message; the text is its reason, ``code`` its gRPC status name, ``rejoin`` (a
    several-client run) the step this client resumes from because a restarted peer rejoined the run there."""

    def __init__(self, reason: str, code: str = "UNKNOWN", rejoin: int | None = None):
        super().__init__(reason)
        self.code = code
        self.rejoin = rejoin

    @classmethod
    def of(cls, reply) -> "RemoteError":
        """The refusal an ``error`` reply carries."""
        rejoin = reply.meta.get("rejoin")
        return cls(reply.meta.get("reason", "the server refused the message"), reply.meta.get("code", "UNKNOWN"),
                   rejoin if isinstance(rejoin, int) and not isinstance(rejoin, bool) and rejoin >= 0 else None)


class ConnectionLost(RemoteError):
    """The connection to the server broke in the middle of a run; the text says how to resume."""


@dataclass
class Traffic:
    """The bytes a channel carried each way during a block (``Channel.metered``)."""

    up: int = 0
    down: int = 0


class Channel(ABC):
    """Carries frames to the server and their replies back, many in flight at once; counts every frame's
    bytes once, when it is handed over. What a frame means is the cut link's business (``cut/``)."""

    def __init__(self):
        self.bytes_up = 0
        self.bytes_down = 0
        self.messages_up = 0
        self.messages_down = 0
        self._count = threading.Lock()
        self._meters: list[Traffic] = []  # the blocks being measured (``metered``): each counts its own bytes

    def metered(self) -> contextlib.AbstractContextManager[Traffic]:
        """The bytes this channel carries while the block runs, counted into a ``Traffic`` of the block's own (no
        before/after difference of shared counters: two blocks measured at once each get theirs)."""
        return enrolled(self._meters, Traffic(), self._count)

    def request(self, frame: bytes) -> Future:
        """Send ``frame``; the future's result is the reply frame (its ``arrived_at`` the time it came)."""
        with self._count:
            self.bytes_up += len(frame)
            self.messages_up += 1
            for meter in self._meters:
                meter.up += len(frame)
        future = self._submit(frame)
        future.add_done_callback(self._count_reply)
        return future

    def _count_reply(self, future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        with self._count:
            self.bytes_down += len(future.result())
            self.messages_down += 1
            for meter in self._meters:
                meter.down += len(future.result())

    @abstractmethod
    def _submit(self, frame: bytes) -> Future:
        """Hand ``frame`` to the transport; complete the future with the reply frame."""

    def wait(self, future: Future, msg: Message) -> bytes:
        """The reply frame to ``msg`` (a transport may bound the wait)."""
        return future.result()

    def call(self, msg: Message) -> Message:
        """Send one message raw and wait for its reply (the hello, tests, tools): no chain, no codec."""
        reply = decode_frame(self.wait(self.request(encode_frame(msg)), msg))
        if reply.kind == "error":
            raise RemoteError.of(reply)
        return reply

    def close(self) -> None:
        pass


def arrived(future: Future, frame: bytes) -> None:
    """Complete ``future`` with a reply frame, stamping when it arrived (the link's wire time)."""
    future.arrived_at = time.perf_counter()
    future.set_result(frame)
