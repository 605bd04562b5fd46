"""Why a client cannot connect, in words, within a few seconds.

gRPC retries a failed connection until its deadline and then names only the last transport error
("Socket closed" for both a plaintext client at a TLS port and a missing client certificate). When a
channel's first connection attempt fails, :func:`diagnose` opens one TCP connection and, with Python's
``ssl`` module and the client's own files, does the TLS handshake gRPC would do, then reads the
server's first HTTP/2 frame: each way this fails has one cause, and the message names the flag that
fixes it. Nothing definite (a server that accepts connections but is still starting) returns None, and
the client keeps waiting.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path

from .transport import Address, parse_server

GRACE_S = 2.0  # a channel neither ready nor failed after this (no answer to its connection): find out why
PROBE_S = 3.0  # the probe's own connect / handshake / first-read timeout
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS frame

NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "UNEXPECTED_RECORD")
# alerts a TLS 1.2 server (or a TLS 1.3 server after the handshake) sends for a missing or refused client certificate
CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE", "UNKNOWN_CA", "BAD_CERTIFICATE",
                      "CERTIFICATE_UNKNOWN", "HANDSHAKE_FAILURE", "ACCESS_DENIED", "DECRYPT_ERROR", "CERTIFICATE_EXPIRED")
VERIFY_HOSTNAME = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
VERIFY_EXPIRED, VERIFY_NOT_YET = 10, 9


def diagnose(address: Address | str, ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
             timeout_s: float = PROBE_S) -> str | None:
    """The reason a splittune client cannot connect to ``address`` (a URL or a parsed one), or None when
    the server answers as it should or nothing definite is found."""
    if isinstance(address, str):
        address = parse_server(address)
    host = address.host.strip("[]")
    try:
        raw = socket.create_connection((host, address.port), timeout=timeout_s)
    except socket.gaierror:
        return f"cannot resolve the host name {host!r}"
    except ConnectionRefusedError:
        return f"nothing listens at {address.target} (is `splittune serve` running there, on that port?)"
    except TimeoutError:
        return None  # no answer at all (a firewall, a host still booting): nothing definite, the client waits
    except OSError as err:
        return f"cannot connect to {address.target}: {err.strerror or err}"
    with raw:
        raw.settimeout(timeout_s)
        if address.tls:
            return _tls_cause(raw, address, ca, cert, key)
        return _plaintext_cause(raw, address)


def wait_until_ready(channel, url: str, ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
                     timeout_s: float = 30.0, grace_s: float = GRACE_S) -> None:
    """Wait for ``channel`` to connect. When its first attempt fails (or it is not ready after ``grace_s``),
    :func:`diagnose` says why, and a connection that cannot work fails at once with its cause
    (:class:`RemoteError`, ``UNAVAILABLE``); one that may yet work is waited for up to ``timeout_s``.
    The channel is closed on failure."""
    import threading

    import grpc

    from .base import RemoteError

    started = time.monotonic()
    seen: dict[str, bool] = {}
    changed = threading.Event()

    def watch(state) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            seen[state.name] = True
            changed.set()

    channel.subscribe(watch, try_to_connect=True)
    try:
        changed.wait(min(grace_s, timeout_s))
        if "READY" in seen:
            return
        cause = diagnose(url, ca, cert, key, timeout_s=min(PROBE_S, max(timeout_s - grace_s, 0.5)))
    finally:
        channel.unsubscribe(watch)
    if cause is None:  # perhaps a server still starting: wait for it as long as asked
        ready = grpc.channel_ready_future(channel)
        try:
            ready.result(timeout=max(0.0, timeout_s - (time.monotonic() - started)))
            return
        except grpc.FutureTimeoutError:
            ready.cancel()
    channel.close()
    if cause is None:
        raise RemoteError(f"cannot reach a splittune server at {url} within {timeout_s:g} s", "UNAVAILABLE")
    raise RemoteError(f"cannot connect to {url}: {cause}", "UNAVAILABLE")


# -- the causes ------------------------------------------------------------------------------------------

def _plaintext_cause(raw: socket.socket, address: Address) -> str | None:
    """A plaintext client: does the server speak TLS? (gRPC itself only sees the socket close.)"""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with context.wrap_socket(raw, server_hostname=address.host.strip("[]")):
            pass
    except ssl.SSLError as err:  # an alert is TLS speaking; anything else (a plaintext server) is no finding
        return f"the server speaks TLS; use grpcs://{address.target}" if any(a in _reason(err) for a in CLIENT_CERT_ALERTS) else None
    except OSError:
        return None
    return f"the server speaks TLS; use grpcs://{address.target}"


def _tls_cause(raw: socket.socket, address: Address, ca, cert, key) -> str | None:
    try:
        context = _context(ca, cert, key)
    except (OSError, ssl.SSLError, ValueError) as err:
        return f"cannot use the TLS files: {err}"
    try:
        tls = context.wrap_socket(raw, server_hostname=address.host.strip("[]"))
    except ssl.SSLCertVerificationError as err:
        return _verify_cause(err, address, ca)
    except ssl.SSLError as err:
        reason = _reason(err)
        if reason in NOT_TLS:
            return (f"the server does not speak TLS (it listens in plaintext); use grpc://{address.target} on loopback, "
                    "or start serve with --tls-cert and --tls-key")
        if any(alert in reason for alert in CLIENT_CERT_ALERTS):
            return _client_cert_cause(cert)
        return f"the TLS handshake failed: {reason or err}"
    except OSError:
        return None  # accepted, but no handshake yet: a server that is still starting
    with tls:
        try:
            tls.sendall(H2_PREFACE)
            first = tls.recv(9)
        except ssl.SSLError as err:
            return _client_cert_cause(cert) if any(a in _reason(err) for a in CLIENT_CERT_ALERTS) else None
        except ConnectionResetError:
            first = b""
        except OSError:
            return None
    if not first:  # the handshake passed on our side, then the server hung up: it did not accept our certificate
        return _client_cert_cause(cert)
    return None


def _client_cert_cause(cert) -> str:
    if cert is None:
        return "the server requires a client certificate (mutual TLS); pass --tls-cert and --tls-key"
    return (f"the server refused this client's certificate (--tls-cert {cert}): it is not signed by the CA the server "
            "trusts (its --tls-client-ca), or it has expired")


def _verify_cause(err: ssl.SSLCertVerificationError, address: Address, ca) -> str:
    code, detail = err.verify_code, err.verify_message
    if code in VERIFY_HOSTNAME:
        return (f"certificate verification failed: the server's certificate does not cover {address.host!r} "
                f"(connect with a name it covers, or reissue it for that name, e.g. splittune certs --host {address.host})")
    if code == VERIFY_EXPIRED:
        return "certificate verification failed: the server's certificate has expired"
    if code == VERIFY_NOT_YET:
        return "certificate verification failed: the server's certificate is not valid yet (check the clocks)"
    if ca is None:
        return ("certificate verification failed: the server's certificate is not signed by a CA this client trusts; "
                f"pass --tls-ca (the CA that signed it, e.g. the ca.pem of splittune certs) ({detail})")
    return f"certificate verification failed: the server's certificate is not signed by the CA in --tls-ca {ca} ({detail})"


def _context(ca, cert, key) -> ssl.SSLContext:
    """The trust gRPC uses: ``ca`` when given, else gRPC's own roots (not the system's)."""
    roots = ca
    if roots is None:
        roots = os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
    if roots is None:
        try:
            import grpc

            bundled = Path(grpc.__file__).parent / "_cython" / "_credentials" / "roots.pem"
            roots = bundled if bundled.exists() else None
        except ImportError:  # pragma: no cover
            roots = None
    context = ssl.create_default_context(cafile=str(roots) if roots is not None else None)
    context.set_alpn_protocols(["h2"])
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def _reason(err: ssl.SSLError) -> str:
    return str(getattr(err, "reason", None) or err).upper()
