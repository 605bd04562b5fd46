"""In-process channel: the same frames as over the network, served by the server on its own thread.

Encoding and decoding really happen (the server never sees the client's tensors, only bytes), so byte
counts, codecs and validation are exactly those of a deployment. The server's end runs on a thread of
its own, serving this session's frames in the order they were sent, so a client computes while the
server computes, as two machines would.
"""

from __future__ import annotations

import functools
import queue
import weakref
from concurrent.futures import Future
from typing import Callable

from .. import workers
from .base import Channel, RemoteError, arrived


class LocalChannel(Channel):
    """``serve`` turns a request frame into a reply frame (the server's cut link)."""

    def __init__(self, serve: Callable[[bytes], bytes]):
        super().__init__()
        self.serve = serve
        self._closed = False
        self._frames: queue.Queue = queue.Queue()
        stop = functools.partial(self._frames.put, None)
        self._thread = workers.start(_serve_in_order, (self._frames, serve), "splittune-local-server", stop)
        weakref.finalize(self, stop)  # a channel nobody holds stops its server thread

    def _submit(self, frame: bytes) -> Future:
        future: Future = Future()
        if self._closed:
            future.set_exception(RemoteError("the channel to the server is closed", "UNAVAILABLE"))
        else:
            self._frames.put((frame, future))
        return future

    def close(self) -> None:
        self._closed = True
        self._frames.put(None)


def _serve_in_order(frames: queue.Queue, serve: Callable[[bytes], bytes]) -> None:
    """The server's thread for one channel (a function, not a method, so it does not keep the channel alive)."""
    while True:
        item = frames.get()
        if item is None:
            return
        frame, future = item
        try:
            arrived(future, serve(frame))
        except BaseException as err:  # a fault of the server's must reach the waiting client, not kill the thread
            future.set_exception(err)
        del item, frame, future
