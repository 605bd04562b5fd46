"""What crosses the network: typed messages, their frames, and the codecs that turn tensors into bytes."""

from .codecs import CODECS, Codec, get_codec
from .frames import FrameError, FrameLimits, decode_frame, encode_frame
from .messages import KINDS, Message

__all__ = ["CODECS", "Codec", "get_codec", "FrameError", "FrameLimits", "decode_frame", "encode_frame", "KINDS", "Message"]
