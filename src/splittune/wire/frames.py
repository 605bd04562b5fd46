"""Frames: a message's bytes. ``MAGIC | u32 header length | msgpack header | tensor payloads``.

No pickle: the header is msgpack of plain values, payloads are raw bytes described by the header: per
tensor its name, dtype, shape, codec, the codec's params and the payload length. Every field is validated
before any tensor is built (lengths against each codec's exact ``encoded_size``), then payload content
(scales, levels, indices) as each tensor is decoded, so a corrupt or hostile frame is refused with a
``FrameError`` naming the tensor and the field and is never half-used (DESIGN.md contract 5).

Memory: ``encode_frame`` joins the header and every payload once (a raw payload is a view of the tensor, so
that join is its only copy). ``decode_frame`` of a writable buffer (``bytearray``) shares it with the tensors
whose payload is their own bytes (raw, or a cast to the same dtype): hand the buffer over and do not reuse
it (it cannot be resized while they live). Of a read-only ``bytes`` frame it copies each payload once, so
no tensor ever writes into an immutable object (and torch.frombuffer never sees a read-only buffer).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Mapping

import msgpack
import torch

from .codecs import CODECS, DTYPE_NAMES, DTYPES, ITEMSIZE, Codec, CodecSpec, make_codec
from .errors import FrameError
from .messages import KINDS, Message

MAGIC = b"STN1"
_LEN = struct.Struct("<I")

__all__ = ["MAGIC", "FrameError", "FrameLimits", "Parsed", "encode_frame", "decode_frame", "parse_frame"]


@dataclass(frozen=True)
class FrameLimits:
    max_frame_bytes: int = 1 << 31
    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096  # a state message carries every adapter tensor of a party
    max_tensor_elements: int = 1 << 31
    max_dims: int = 8
    # what the frame's tensors take once decoded: a sparse (topk) payload of a few bytes may name a huge tensor
    max_decoded_bytes: int = 1 << 32


def encode_frame(
    msg: Message,
    codecs: Mapping[str, CodecSpec] | None = None,
    *,
    generator: torch.Generator | None = None,
    decoded: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """Encode ``msg``. ``codecs`` maps tensor names to codecs: a name (``"int8"``), a spec map
    (``{"name": "int4", "group": 64}``) or a ``Codec``; unnamed tensors go ``raw``. A lossy codec for an integer
    or bool tensor is refused (``ValueError`` naming the tensor): leave masks and labels out of the map.
    ``generator`` seeds stochastic codecs. When ``decoded`` is a dict it receives, per tensor, what the receiver
    will decode (bit for bit, on the sender's device) - the cheap way to compute error feedback."""
    codecs = codecs or {}
    entries, payloads = [], []
    for name, tensor in msg.tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise FrameError(f"tensor {name!r} has dtype {tensor.dtype}, which frames do not carry")
        try:
            codec = make_codec(codecs.get(name, "raw"))
        except ValueError as err:
            raise ValueError(f"tensor {name!r}: {err}") from None
        if not codec.supports(tensor.dtype):
            raise ValueError(
                f"tensor {name!r} is {DTYPE_NAMES[tensor.dtype]}; codec {codec.name} carries only floating tensors "
                "(integer and bool tensors such as masks and labels go raw: leave them out of the codec map)"
            )
        try:
            if decoded is None:
                payload, params = codec.encode(tensor, generator)
            else:
                payload, params, decoded[name] = codec.encode_with_decoded(tensor, generator)
        except ValueError as err:
            raise ValueError(f"tensor {name!r}: {err}") from None
        parts = payload if isinstance(payload, tuple) else (payload,)
        entries.append({
            "name": name, "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "codec": codec.name,
            "params": params, "nbytes": sum(memoryview(p).nbytes for p in parts),
        })
        payloads.extend(parts)
    header = msgpack.packb(
        {"kind": msg.kind, "session": msg.session, "step": msg.step, "micro": msg.micro, "meta": msg.meta, "tensors": entries},
        use_bin_type=True,
    )
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *payloads])


def _require(cond: bool, why: str) -> None:
    if not cond:
        raise FrameError(why)


def decode_frame(frame: bytes | bytearray | memoryview, limits: FrameLimits = FrameLimits()) -> Message:
    """The message in ``frame``, or a ``FrameError`` saying which field is wrong (never any other error)."""
    return parse_frame(frame, limits).decode()


def parse_frame(frame: bytes | bytearray | memoryview, limits: FrameLimits = FrameLimits()) -> "Parsed":
    """``frame``'s header and every tensor entry checked, no payload decoded yet (``Parsed.decode``); a
    ``FrameError`` saying which field is wrong (never any other error)."""
    try:
        return _parse_frame(frame, limits)
    except FrameError:
        raise
    except Exception as err:  # a check this module lacks must still be a refusal, not a crash
        raise FrameError(f"frame could not be decoded: {type(err).__name__}: {err}") from None


@dataclass
class Parsed:
    """A frame whose header is checked but whose tensors are not built: a server first checks who owns
    ``session``, then decodes with that session's codecs, so a stranger's frame never allocates anything."""

    kind: str
    session: str
    step: int
    micro: int
    meta: dict
    plans: list
    view: memoryview
    decoded_bytes: int  # what the tensors take once decoded
    received_at: float = 0.0  # when the server took it off the wire (its time on a message runs from here)

    def decode(self, codecs: Mapping[str, Codec] | None = None) -> Message:
        """The message. With ``codecs`` (the receiver's codecs by name, with the options its session agreed), each
        payload may expand at most that codec's ``max_ratio`` (a codec not named: its header's defaults): a sparse
        payload of a few bytes that names a huge tensor is refused before anything is allocated."""
        try:
            if codecs is not None:
                for name, dtype, shape, codec, params, nbytes, _ in self.plans:
                    wanted = math.prod(shape) * ITEMSIZE[dtype]
                    ratio = codecs.get(codec.name, codec).max_ratio(dtype)
                    _require(wanted <= nbytes * ratio, f"tensor {name!r}: {nbytes} payload bytes of codec {codec.name} would "
                                                       f"decode to {wanted} bytes, more than the {ratio:g}x a legal payload expands")
            tensors = {}
            for name, dtype, shape, codec, params, nbytes, start in self.plans:
                try:
                    tensors[name] = codec.decode(self.view[start : start + nbytes], dtype, shape, params)
                except FrameError as err:
                    raise FrameError(f"tensor {name!r}: {codec.name} {err}") from None
                except Exception as err:
                    raise FrameError(f"tensor {name!r}: codec {codec.name} could not decode it: {err}") from None
        except FrameError:
            raise
        except Exception as err:
            raise FrameError(f"frame could not be decoded: {type(err).__name__}: {err}") from None
        return Message(self.kind, self.session, self.step, self.micro, tensors, self.meta)


def _parse_frame(frame, limits: FrameLimits) -> Parsed:
    try:
        view = memoryview(frame)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except (TypeError, ValueError) as err:
        raise FrameError(f"a frame is a contiguous byte buffer: {err}") from None
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
    # every field of every tensor first, then the payloads
    offset, plans, names, decoded_bytes = 8 + hlen, [], set(), 0
    for entry in entries:
        plan = _check_entry(entry, view, offset, limits)
        name, dtype, shape, nbytes = plan[0], plan[1], plan[2], plan[5]
        _require(name not in names, f"tensor {name!r} appears twice")
        names.add(name)
        decoded_bytes += math.prod(shape) * ITEMSIZE[dtype]
        _require(decoded_bytes <= limits.max_decoded_bytes, f"tensor {name!r}: the frame's tensors would take more than {limits.max_decoded_bytes} bytes decoded")
        plans.append((*plan, offset))
        offset += nbytes
    _require(offset == len(view), f"frame has {len(view) - offset} bytes beyond its declared tensors")
    return Parsed(kind, header["session"], header["step"], header["micro"], header["meta"], plans, view, decoded_bytes)


def _check_entry(entry, view: memoryview, offset: int, limits: FrameLimits):
    _require(isinstance(entry, dict), "a tensor entry must be a map")
    fields = {"name", "dtype", "shape", "codec", "params", "nbytes"}
    _require(set(entry) == fields, f"tensor entry fields {sorted(entry)} differ from {sorted(fields)}")
    name = entry["name"]
    _require(isinstance(name, str) and 0 < len(name) <= 128, f"bad tensor name {name!r}")
    _require(isinstance(entry["dtype"], str) and entry["dtype"] in DTYPES, f"tensor {name!r}: dtype {entry['dtype']!r} is not one of {', '.join(DTYPES)}")
    shape = entry["shape"]
    _require(
        isinstance(shape, list) and len(shape) <= limits.max_dims and all(type(d) is int and d >= 0 for d in shape),
        f"tensor {name!r}: shape {shape!r} must be a list of at most {limits.max_dims} non-negative integers",
    )
    shape = tuple(shape)
    _require(math.prod(shape) <= limits.max_tensor_elements, f"tensor {name!r}: shape has {math.prod(shape)} elements, over the limit of {limits.max_tensor_elements}")
    nbytes = entry["nbytes"]
    _require(type(nbytes) is int and 0 <= nbytes <= len(view) - offset, f"tensor {name!r}: nbytes {nbytes!r} run past the frame")
    _require(isinstance(entry["codec"], str) and entry["codec"] in CODECS, f"tensor {name!r}: unknown codec {entry['codec']!r}; codecs: {', '.join(CODECS)}")
    cls, params, dtype = CODECS[entry["codec"]], entry["params"], DTYPES[entry["dtype"]]
    try:
        codec = cls.from_header(params)
    except FrameError as err:
        raise FrameError(f"tensor {name!r}: {cls.name} {err}") from None
    _require(codec.supports(dtype), f"tensor {name!r}: dtype {entry['dtype']} is not carried by codec {codec.name} (floating tensors only)")
    try:
        expected = codec.encoded_size(dtype, shape, params)
    except FrameError as err:
        raise FrameError(f"tensor {name!r}: {codec.name} {err}") from None
    _require(expected == nbytes, f"tensor {name!r}: nbytes {nbytes} for {codec.name} of {entry['dtype']}{list(shape)}, which needs {expected}")
    return name, dtype, shape, codec, params, nbytes
