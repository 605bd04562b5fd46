"""What crosses the network: typed messages, their frames, and the codecs that turn tensors into bytes."""

from .codecs import CODECS, Codec, CodecSpec, get_codec, make_codec, register_codec
from .errors import FrameError
from .frames import FrameLimits, Parsed, decode_frame, encode_frame, parse_frame
from .messages import KINDS, Message

__all__ = [
    "CODECS", "Codec", "CodecSpec", "get_codec", "make_codec", "register_codec",
    "FrameError", "FrameLimits", "Parsed", "decode_frame", "encode_frame", "parse_frame", "KINDS", "Message",
]
