"""The gRPC channel: the same interface as the local one over a bidirectional stream (DESIGN.md contract 4).

Frames are the same bytes as in-process and are counted the same way (chunk flags and correlation ids
are transport, not frame, so byte counts are identical to the local channel's). Many frames are in
flight at once; each reply finds its request by correlation id, in whatever order replies come.
Keepalive pings find a dead connection; a per-reply deadline finds a live server that stopped
answering (a stream-wide deadline would cap the run).
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import grpc

from .probe import wait_until_ready
from .transport import CHUNK_BYTES, KEEPALIVE, MAX_CHUNK_BYTES, SESSION_METHOD, ChunkError, Reassembler, chunks, parse_server
from .. import workers
from ..wire import FrameLimits, Message
from .base import Channel, RemoteError, arrived


class GrpcChannel(Channel):
    def __init__(self, url: str, client_id: str = "anonymous", token: str | None = None, ca: Path | None = None,
                 cert: Path | None = None, key: Path | None = None, chunk_bytes: int = CHUNK_BYTES,
                 connect_timeout_s: float = 30.0, reply_timeout_s: float = 3600.0):
        super().__init__()
        self.address = parse_server(url)
        self.chunk_bytes = chunk_bytes
        self.reply_timeout_s = reply_timeout_s
        options = [*KEEPALIVE, ("grpc.max_receive_message_length", MAX_CHUNK_BYTES + 16),
                   ("grpc.max_send_message_length", MAX_CHUNK_BYTES + 16)]
        if self.address.tls:
            read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
            creds = grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))
            self._channel = grpc.secure_channel(self.address.target, creds, options)
        else:
            self._channel = grpc.insecure_channel(self.address.target, options)
        wait_until_ready(self._channel, url, ca, cert, key, connect_timeout_s)  # a connection that cannot work fails in seconds, with its cause
        metadata = [("x-splittune-client", client_id)]
        if token is not None:
            metadata.append(("authorization", f"Bearer {token}"))
        self._requests: queue.Queue = queue.Queue()
        stream = self._channel.stream_stream(SESSION_METHOD, request_serializer=None, response_deserializer=None)
        self._responses = stream(iter(self._requests.get, None), metadata=metadata)
        self._waiting: dict[int, Future] = {}  # correlation id -> the reply it waits for
        self._next = itertools.count(1)
        self._lock = threading.Lock()
        self._failure: RemoteError | None = None  # once the stream fails, every later request fails the same way
        self._closed = False
        self._receiver = workers.start(_receive, (self._responses, weakref.ref(self)), "splittune-grpc-replies",
                                       functools.partial(_hang_up, self._requests, self._responses, self._channel))

    def _submit(self, frame: bytes) -> Future:
        future: Future = Future()
        with self._lock:
            if self._failure is not None:
                future.set_exception(self._failure)
                return future
            corr = next(self._next)
            self._waiting[corr] = future
        for chunk in chunks(frame, self.chunk_bytes, corr):
            self._requests.put(chunk)
        return future

    def wait(self, future: Future, msg: Message) -> bytes:
        try:
            return future.result(timeout=self.reply_timeout_s)
        except FutureTimeout:
            self._fail(RemoteError(f"no reply to {msg.kind!r} (step {msg.step}) within {self.reply_timeout_s:g} s; "
                                   "the server is up but stopped answering (raise --reply-timeout if its rounds are slower)",
                                   "DEADLINE_EXCEEDED"))
            raise self._failure from None

    def _fail(self, failure: RemoteError) -> None:
        """The stream is over (or out of step): every waiting and later request fails with ``failure``."""
        with self._lock:
            if self._failure is None:
                self._failure = failure
            waiting, self._waiting = self._waiting, {}
        self._responses.cancel()
        self._channel.close()  # nothing more can cross; a channel left open would be closed by the collector, at exit
        for future in waiting.values():
            if not future.done():
                future.set_exception(self._failure)

    def _deliver(self, corr: int, frame: bytes) -> None:
        with self._lock:
            future = self._waiting.pop(corr, None)
        if future is None:
            raise ChunkError(f"a reply for request {corr}, which is not waiting")
        arrived(future, frame)

    def close(self) -> None:
        """End the stream, close the channel and wait for the reply thread: a gRPC call left to the garbage
        collector can hang the interpreter's exit forever (grpcio waits in ``_ChannelCallState.__del__``)."""
        if self._closed:
            return
        self._closed = True
        _hang_up(self._requests, self._responses, self._channel)
        if self._receiver is not threading.current_thread():
            self._receiver.join(CLOSE_WAIT_S)


CLOSE_WAIT_S = 5.0  # the reply thread leaves as soon as the cancelled stream raises; this only bounds a stuck one


def _hang_up(requests: queue.Queue, responses, channel) -> None:
    """End the stream from this side and close the channel (also at exit, for a channel nobody closed: the reply
    thread must not be inside gRPC when the interpreter tears down)."""
    requests.put(None)
    responses.cancel()
    channel.close()


def _receive(responses, channel_ref) -> None:
    """Moves reply frames from the stream to the requests waiting for them (a function holding a weak
    reference, not a method: the thread must not keep an unclosed channel alive)."""
    parts = Reassembler(FrameLimits().max_frame_bytes)
    failure = RemoteError("the server closed the session", "UNAVAILABLE")
    try:
        for chunk in responses:
            done = parts.add(chunk)
            channel = channel_ref()
            if channel is None:
                return
            if done is not None:
                channel._deliver(*done)
            del channel
    except grpc.RpcError as err:
        failure = RemoteError(err.details() or str(err), err.code().name)
    except ChunkError as err:  # the stream is out of step: nothing later can be trusted
        failure = RemoteError(f"the server sent a malformed chunk: {err}", "DATA_LOSS")
    channel = channel_ref()
    if channel is not None:
        channel._fail(failure)
