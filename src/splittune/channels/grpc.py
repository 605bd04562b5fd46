"""The gRPC channel: the same interface as the local one over a bidirectional stream (DESIGN.md contract 4).

Frames are the same bytes as in-process and are counted the same way (the chunk flags are transport,
not frame, so byte counts are identical to the local channel's). Keepalive pings find a dead connection;
a per-reply deadline finds a live server that stopped answering (a stream-wide deadline would cap the run).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import grpc

from ..deploy.wire import CHUNK_BYTES, KEEPALIVE, LAST, MAX_CHUNK_BYTES, MORE, SESSION_METHOD, chunks, parse_server
from ..wire import Message, decode_frame
from .base import Channel, RemoteError


class GrpcChannel(Channel):
    def __init__(self, url: str, client_id: str = "anonymous", token: str | None = None, ca: Path | None = None,
                 cert: Path | None = None, key: Path | None = None, chunk_bytes: int = CHUNK_BYTES,
                 connect_timeout_s: float = 30.0, reply_timeout_s: float = 3600.0, **kwargs):
        super().__init__(**kwargs)
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
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise RemoteError(f"cannot reach a splittune server at {url} within {connect_timeout_s:g} s", "UNAVAILABLE") from None
        metadata = [("x-splittune-client", client_id)]
        if token is not None:
            metadata.append(("authorization", f"Bearer {token}"))
        self._requests: queue.Queue = queue.Queue()
        stream = self._channel.stream_stream(SESSION_METHOD, request_serializer=None, response_deserializer=None)
        self._responses = stream(iter(self._requests.get, None), metadata=metadata)
        self._replies: queue.Queue = queue.Queue()
        self._failure: RemoteError | None = None  # once the stream fails, every later call fails the same way
        threading.Thread(target=_receive, args=(self._responses, self._replies), daemon=True).start()

    def call(self, msg: Message) -> Message:
        if self._failure is not None:
            raise self._failure
        frame = self.encode_up(msg)
        # a tap sees what the server receives (after the codec), as on the local channel
        self._observe("up", decode_frame(frame) if self.taps else msg, len(frame))
        for chunk in chunks(frame, self.chunk_bytes):
            self._requests.put(chunk)
        parts = []
        while True:
            try:
                chunk = self._replies.get(timeout=self.reply_timeout_s)
            except queue.Empty:
                self._failure = RemoteError(f"no reply to {msg.kind!r} (step {msg.step}) within {self.reply_timeout_s:g} s; "
                                            "the server is up but stopped answering (raise --reply-timeout if its rounds are slower)",
                                            "DEADLINE_EXCEEDED")
                self._responses.cancel()
                raise self._failure from None
            if isinstance(chunk, RemoteError):
                self._failure = chunk
                raise chunk
            if not chunk or chunk[0] not in (MORE, LAST):  # the stream is out of step: nothing later can be trusted
                self._failure = RemoteError("the server sent a malformed chunk", "DATA_LOSS")
                self._responses.cancel()
                raise self._failure
            parts.append(chunk[1:])
            if chunk[0] == LAST:
                return self.receive_down(b"".join(parts))

    def close(self) -> None:
        self._requests.put(None)
        self._channel.close()


def _receive(responses, replies: queue.Queue) -> None:
    """Moves reply chunks from the stream to a queue, so that ``call`` can wait for them with a deadline
    (a function, not a method: the thread must not keep an unclosed channel alive)."""
    try:
        for chunk in responses:
            replies.put(chunk)
        replies.put(RemoteError("the server closed the session", "UNAVAILABLE"))
    except grpc.RpcError as err:
        replies.put(RemoteError(err.details() or str(err), err.code().name))
