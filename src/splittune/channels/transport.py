"""How frames ride on gRPC: one bidirectional stream per client session, frames cut into chunks.

A chunk is one gRPC message: a flag byte (``MORE`` or ``LAST``), the frame's correlation id (u32, little
endian: many frames are in flight on one stream, and a reply carries its request's id) and up to
``chunk_bytes`` of the frame. Flags and ids are transport, not frame: byte counts are the frames'.
No code generation: the methods are registered by name with raw-bytes (de)serializers.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import SplittuneError

class DeployError(SplittuneError, ValueError):
    """A deployment setting that cannot work (address, TLS files, tokens); the message says which."""


SESSION_METHOD = "/splittune.Split/Session"
HEALTH_METHOD = "/splittune.Split/Health"
MORE, LAST = 0, 1
CHUNK_BYTES = 1 << 20  # default chunk: far below gRPC's 4 MiB message limit
MAX_CHUNK_BYTES = 4 << 20
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


CORR = struct.Struct("<I")
CHUNK_HEADER = 1 + CORR.size


def chunks(frame: bytes, size: int = CHUNK_BYTES, corr: int = 0) -> Iterator[bytes]:
    """``frame`` as flagged chunks of at most ``size`` payload bytes (an empty frame is one LAST chunk)."""
    if not 1 <= size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk size must be 1..{MAX_CHUNK_BYTES} bytes, got {size}")
    view = memoryview(frame)
    tag = CORR.pack(corr)
    for start in range(0, max(len(frame), 1), size):
        yield b"".join((bytes([LAST if start + size >= len(frame) else MORE]), tag, view[start : start + size]))


class ChunkError(ValueError):
    """A chunk that breaks the stream's framing (the stream cannot be trusted after it)."""


MAX_PARTIAL_FRAMES = 64  # frames one stream may have begun and not finished (a client interleaves its micro-batches')


class Reassembler:
    """Frames from chunks, several interleaved by correlation id; each finished frame is returned once.

    What one stream may hold unfinished is bounded: at most ``max_partial`` frames begun, together at most
    ``max_buffered_bytes`` (by default the size of one largest frame), so many half-sent frames cost no more memory
    than one whole one."""

    def __init__(self, max_frame_bytes: int, max_partial: int = MAX_PARTIAL_FRAMES, max_buffered_bytes: int | None = None):
        self.max_frame_bytes = max_frame_bytes
        self.max_partial = max_partial
        self.max_buffered_bytes = max_buffered_bytes or max_frame_bytes
        self.parts: dict[int, bytearray] = {}
        self.buffered = 0

    def add(self, chunk: bytes) -> tuple[int, bytes] | None:
        if len(chunk) < CHUNK_HEADER or chunk[0] not in (MORE, LAST):
            raise ChunkError("malformed chunk: a chunk is a flag byte (0 more, 1 last), a 4-byte correlation id and data")
        (corr,) = CORR.unpack_from(chunk, 1)
        if corr not in self.parts and len(self.parts) >= self.max_partial:
            raise ChunkError(f"unfinished frames on one stream exceed {self.max_partial}")
        buffer = self.parts.setdefault(corr, bytearray())
        buffer += memoryview(chunk)[CHUNK_HEADER:]
        self.buffered += len(chunk) - CHUNK_HEADER
        if len(buffer) > self.max_frame_bytes:
            raise ChunkError(f"frame exceeds {self.max_frame_bytes} bytes")
        if self.buffered > self.max_buffered_bytes:
            raise ChunkError(f"unfinished frames on one stream exceed {self.max_buffered_bytes} bytes together")
        if chunk[0] == MORE:
            return None
        del self.parts[corr]
        self.buffered -= len(buffer)
        return corr, buffer


LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    tls: bool

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


def parse_server(url: str) -> Address:
    """``grpc://host:port`` (plaintext, loopback only) or ``grpcs://host:port`` (TLS)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("grpc", "grpcs"):
        raise DeployError(f"--server must look like grpcs://host:port (or grpc://127.0.0.1:port on loopback), got {url!r}")
    address = parse_listen(rest, tls=scheme == "grpcs")
    if address.port == 0:
        raise DeployError(f"--server needs the server's port (1..65535), got {url!r}")
    if not address.tls and not is_loopback(address.host):
        raise DeployError(
            f"plaintext grpc:// is allowed only to a loopback address (127.0.0.1, localhost, [::1]); use grpcs://{rest} for {address.host}"
        )
    return address


def parse_listen(text: str, tls: bool = False) -> Address:
    """``HOST:PORT``; port 0 asks the kernel for a free one (the server then says which)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise DeployError(f"an address must be HOST:PORT with a port in 0..65535 (0: any free port), got {text!r}")
    return Address(host, int(port), tls)
