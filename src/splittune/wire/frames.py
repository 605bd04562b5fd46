"""Frames: a message's bytes. ``MAGIC | u32 header length | msgpack header | tensor payloads``.

No pickle: the header is msgpack of plain values, payloads are raw bytes described by the header.
Every field is validated before any tensor is built, so a corrupt or hostile frame is refused with
a reason and never half-used (DESIGN.md contract 5).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import msgpack
import torch

from .codecs import DTYPE_NAMES, DTYPES, get_codec
from .messages import KINDS, Message

MAGIC = b"STN1"
_LEN = struct.Struct("<I")


class FrameError(ValueError):
    """A frame that cannot be decoded; the message says which field is wrong."""


@dataclass(frozen=True)
class FrameLimits:
    max_frame_bytes: int = 1 << 31
    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096  # a state message carries every adapter tensor of a party
    max_tensor_elements: int = 1 << 31
    max_dims: int = 8


def encode_frame(msg: Message, codecs: dict[str, str] | None = None) -> bytes:
    """Encode ``msg``; ``codecs`` maps tensor names to codec names (default ``raw``)."""
    entries, payloads = [], []
    for name, tensor in msg.tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise FrameError(f"tensor {name!r} has dtype {tensor.dtype}, which frames do not carry")
        codec = get_codec((codecs or {}).get(name, "raw"))
        data, params = codec.encode(tensor)
        entries.append(
            {"name": name, "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "codec": codec.name, "params": params, "nbytes": len(data)}
        )
        payloads.append(data)
    header = msgpack.packb(
        {"kind": msg.kind, "session": msg.session, "step": msg.step, "micro": msg.micro, "meta": msg.meta, "tensors": entries},
        use_bin_type=True,
    )
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *payloads])


def _require(cond: bool, why: str) -> None:
    if not cond:
        raise FrameError(why)


def decode_frame(frame: bytes | bytearray | memoryview, limits: FrameLimits = FrameLimits()) -> Message:
    view = memoryview(frame)
    _require(len(view) <= limits.max_frame_bytes, f"frame of {len(view)} bytes exceeds the limit of {limits.max_frame_bytes}")
    _require(len(view) >= len(MAGIC) + _LEN.size, f"frame of {len(view)} bytes is shorter than a frame header")
    _require(bytes(view[:4]) == MAGIC, f"bad magic {bytes(view[:4])!r}; not a splittune frame")
    (hlen,) = _LEN.unpack(view[4:8])
    _require(hlen <= limits.max_header_bytes, f"header length {hlen} exceeds the limit of {limits.max_header_bytes}")
    _require(8 + hlen <= len(view), f"header length {hlen} runs past the end of a {len(view)}-byte frame")
    try:
        header = msgpack.unpackb(view[8 : 8 + hlen], raw=False, strict_map_key=True)
    except Exception as err:
        raise FrameError(f"header is not valid msgpack: {err}") from None
    _require(isinstance(header, dict), "header must be a map")
    expected = {"kind", "session", "step", "micro", "meta", "tensors"}
    _require(set(header) == expected, f"header fields {sorted(header)} differ from {sorted(expected)}")
    kind = header["kind"]
    _require(kind in KINDS, f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    _require(isinstance(header["session"], str), "session must be a string")
    for key in ("step", "micro"):
        _require(isinstance(header[key], int) and header[key] >= 0, f"{key} must be a non-negative integer, got {header[key]!r}")
    _require(isinstance(header["meta"], dict), "meta must be a map")
    entries = header["tensors"]
    _require(isinstance(entries, list) and len(entries) <= limits.max_tensors, f"tensors must be a list of at most {limits.max_tensors}")
    offset, tensors = 8 + hlen, {}
    for entry in entries:
        tensor, nbytes = _decode_tensor(entry, view, offset, limits)
        _require(entry["name"] not in tensors, f"tensor {entry['name']!r} appears twice")
        tensors[entry["name"]] = tensor
        offset += nbytes
    _require(offset == len(view), f"frame has {len(view) - offset} bytes beyond its declared tensors")
    return Message(kind, header["session"], header["step"], header["micro"], tensors, header["meta"])


def _decode_tensor(entry, view: memoryview, offset: int, limits: FrameLimits) -> tuple[torch.Tensor, int]:
    _require(isinstance(entry, dict), "a tensor entry must be a map")
    fields = {"name", "dtype", "shape", "codec", "params", "nbytes"}
    _require(set(entry) == fields, f"tensor entry fields {sorted(entry)} differ from {sorted(fields)}")
    name = entry["name"]
    _require(isinstance(name, str) and 0 < len(name) <= 128, f"bad tensor name {name!r}")
    _require(entry["dtype"] in DTYPES, f"tensor {name!r}: dtype {entry['dtype']!r} is not one of {', '.join(DTYPES)}")
    shape = entry["shape"]
    _require(
        isinstance(shape, list) and len(shape) <= limits.max_dims and all(isinstance(d, int) and d >= 0 for d in shape),
        f"tensor {name!r}: shape {shape!r} must be a list of at most {limits.max_dims} non-negative integers",
    )
    _require(math.prod(shape) <= limits.max_tensor_elements, f"tensor {name!r}: {math.prod(shape)} elements exceed the limit")
    nbytes = entry["nbytes"]
    _require(isinstance(nbytes, int) and 0 <= nbytes <= len(view) - offset, f"tensor {name!r}: {nbytes!r} bytes run past the frame")
    _require(isinstance(entry["params"], dict), f"tensor {name!r}: codec params must be a map")
    try:
        codec = get_codec(entry["codec"])
    except ValueError as err:
        raise FrameError(f"tensor {name!r}: {err}") from None
    dtype = DTYPES[entry["dtype"]]
    expected = codec.encoded_size(dtype, tuple(shape), entry["params"])
    _require(expected is None or expected == nbytes, f"tensor {name!r}: {nbytes} payload bytes, but {entry['dtype']}{shape} needs {expected}")
    try:
        tensor = codec.decode(view[offset : offset + nbytes], dtype, tuple(shape), entry["params"])
    except FrameError:
        raise
    except Exception as err:
        raise FrameError(f"tensor {name!r}: codec {codec.name} could not decode it: {err}") from None
    return tensor, nbytes
