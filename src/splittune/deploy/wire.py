"""How frames ride on gRPC: one bidirectional stream per client session, frames cut into chunks.

A chunk is one gRPC message: a flag byte (``MORE`` or ``LAST``) and up to ``chunk_bytes`` of a frame.
No code generation: the methods are registered by name with raw-bytes (de)serializers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

class DeployError(ValueError):
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


def chunks(frame: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``frame`` as flagged chunks of at most ``size`` payload bytes (an empty frame is one LAST chunk)."""
    if not 1 <= size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk size must be 1..{MAX_CHUNK_BYTES} bytes, got {size}")
    view = memoryview(frame)
    for start in range(0, max(len(frame), 1), size):
        part = view[start : start + size]
        yield bytes([LAST if start + size >= len(frame) else MORE]) + bytes(part)


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
    if not address.tls and not is_loopback(address.host):
        raise DeployError(
            f"plaintext grpc:// is allowed only to a loopback address (127.0.0.1, localhost, [::1]); use grpcs://{rest} for {address.host}"
        )
    return address


def parse_listen(text: str, tls: bool = False) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise DeployError(f"an address must be HOST:PORT with a port in 1..65535, got {text!r}")
    return Address(host, int(port), tls)
