"""Link emulation on any channel: a frame arrives after the latency plus its bytes over the bandwidth, and
frames queue behind each other per direction as on a real link, so what pipelining and codecs buy on a
slow link shows on one machine. (For a real emulated link see docs/efficiency.md: ``tc netem``.)

:class:`LinkModel` is the arithmetic alone, a pure function of the times it is given (tests drive it with
a fake clock); :class:`EmulatedChannel` applies it to a real channel with one timer thread.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field

from .. import workers
from .base import Channel, arrived


@dataclass
class LinkModel:
    """``rate`` in bytes per second per direction (None: unlimited), ``latency`` in seconds one way."""

    rate: dict[str, float | None]
    latency: float = 0.0
    free_at: dict[str, float] = field(default_factory=lambda: {"up": 0.0, "down": 0.0})

    @classmethod
    def of(cls, config) -> "LinkModel":
        """From a ``link:`` config section (megabits per second, milliseconds)."""
        def rate(mbps):
            return None if mbps is None else mbps * 1e6 / 8

        both = config.bandwidth_mbps
        return cls({"up": rate(config.up_mbps or both), "down": rate(config.down_mbps or both)}, config.latency_ms / 1e3)

    def deliver(self, direction: str, now: float, nbytes: int) -> float:
        """When a frame of ``nbytes`` handed to the link at ``now`` arrives: it starts once the frames before
        it in its direction are on the wire, takes its bytes over the rate, then the latency."""
        rate = self.rate[direction]
        start = max(now, self.free_at[direction])
        sent = start + (nbytes / rate if rate else 0.0)
        self.free_at[direction] = sent
        return sent + self.latency


class EmulatedChannel(Channel):
    """``inner`` behind an emulated link; bytes are counted here, once, as on any channel."""

    def __init__(self, inner: Channel, model: LinkModel, clock=time.perf_counter):
        super().__init__()
        self.inner, self.model, self.clock = inner, model, clock
        self._due: list = []  # heap of (time, order, action)
        self._order = itertools.count()
        self._cond = threading.Condition()
        stop = functools.partial(_stop, self._due, self._cond)
        self._thread = workers.start(_timer, (self._due, self._cond, clock), "splittune-link", stop)
        weakref.finalize(self, stop)

    def _at(self, when: float, action) -> None:
        with self._cond:
            heapq.heappush(self._due, (when, next(self._order), action))
            self._cond.notify()

    def _submit(self, frame: bytes) -> Future:
        outer: Future = Future()
        with self._cond:
            due = self.model.deliver("up", self.clock(), len(frame))

        def reply(inner: Future) -> None:
            if inner.exception() is not None:
                outer.set_exception(inner.exception())
                return
            back = inner.result()
            with self._cond:
                when = self.model.deliver("down", self.clock(), len(back))
            self._at(when, lambda: arrived(outer, back))

        self._at(due, lambda: self.inner.request(frame).add_done_callback(reply))
        return outer

    def wait(self, future: Future, msg) -> bytes:
        return self.inner.wait(future, msg)

    def close(self) -> None:
        _stop(self._due, self._cond)
        self.inner.close()


def _timer(due: list, cond: threading.Condition, clock) -> None:
    """Runs each action when its time comes, in time order (a function: it must not keep the channel alive)."""
    while True:
        with cond:
            while not due or due[0][0] > clock():
                cond.wait(None if not due else max(due[0][0] - clock(), 0.0))
            _, _, action = heapq.heappop(due)
        if action is None:
            return
        action()


def _stop(due: list, cond: threading.Condition) -> None:
    with cond:
        heapq.heappush(due, (float("-inf"), -1, None))
        cond.notify()
