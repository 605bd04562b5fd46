"""In-process channel: the same frames as over the network, handed to the server's handler directly.

Encoding and decoding really happen (the server never sees the client's tensors, only bytes), so byte
counts, codecs and validation are exactly those of a deployment.
"""

from __future__ import annotations

from typing import Callable

from ..wire import Message, decode_frame, encode_frame
from .base import Channel


class LocalChannel(Channel):
    def __init__(self, handler: Callable[[Message], Message], **kwargs):
        super().__init__(**kwargs)
        self.handler = handler

    def call(self, msg: Message) -> Message:
        frame = self.encode_up(msg)
        received = decode_frame(frame)
        self._observe("up", received, len(frame))
        reply = self.handler(received)
        return self.receive_down(encode_frame(reply, self.codecs_down))
