"""The server process: the party code of ``parties/server/handler.py`` behind gRPC, with authentication, session
ownership, size limits, gRPC statuses and structured logs. Tokens are never logged.

Transport-level faults end the stream with a gRPC status (a wrong token: UNAUTHENTICATED; another
client's session: PERMISSION_DENIED; a malformed frame: INVALID_ARGUMENT; too big: RESOURCE_EXHAUSTED);
the refusals of a message the server understood (NaN, a wrong shape, a step out of turn) come back as
error messages carrying a status name, and the session stays usable. Either way the server keeps
serving every other client, and nothing already trained is touched.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import yaml

from ..device import peak_memory
from ..parties.party import SessionSpec
from ..parties.protocol import bounded
from ..parties.server.handler import Server
from ..parties.server.host import Host
from ..cut.link import ServerLink
from .dashboard import Watch
from ..cut.transforms import ChainError
from ..wire import FrameError, FrameLimits, Message, Parsed
from ..channels.transport import CHUNK_BYTES, HEALTH_METHOD, KEEPALIVE, MAX_CHUNK_BYTES, Address, ChunkError, DeployError, Reassembler, chunks, is_loopback

log = logging.getLogger("splittune.serve")


def load_tokens(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Tokens by client id, and the client indices some ids are bound to, from YAML:
    ``alice: <token>`` (any index) or ``bob: {token: <token>, index: 1}`` (only client 1 of a run)."""
    from .files import warn_if_readable_by_others

    warn_if_readable_by_others(path, "the tokens file")
    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DeployError(f"cannot read tokens file {path}: {err}") from None
    if not isinstance(entries, dict) or not entries:
        raise DeployError(f"tokens file {path} must map client ids to tokens, e.g. 'alice: <token>' or 'bob: {{token: <token>, index: 1}}'")
    tokens, bindings = {}, {}
    for cid, entry in entries.items():
        cid = str(cid)
        if isinstance(entry, dict):
            unknown = set(entry) - {"token", "index"}
            if unknown:
                raise DeployError(f"tokens file {path}: client {cid!r} has unknown keys {sorted(unknown)}; keys: token, index")
            index = entry.get("index")
            if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
                raise DeployError(f"tokens file {path}: the index of client {cid!r} must be a client index (0, 1, …), got {index!r}")
            if index is not None:
                bindings[cid] = index
            entry = entry.get("token")
        if not isinstance(entry, str) or len(entry) < 16:
            raise DeployError(f"tokens file {path}: the token of client {cid!r} must be a string of at least 16 characters")
        tokens[cid] = entry
    return tokens, bindings


HEALTH_WORKERS = 4  # threads no stream may take: ``Health`` answers however many streams are open


@dataclass
class Limits:
    """What one client, or many, may hold of the server (``serve --max-…``, ``--hello-timeout``, ``--idle-timeout``)."""

    frame: FrameLimits = field(default_factory=lambda: FrameLimits(max_frame_bytes=1 << 30))
    max_sessions: int = 64
    max_clients: int = 16  # the largest ``clients`` a run may propose: a hello cannot hold a group open for millions
    max_pending: int = 32  # streams connected but not yet through their hello
    hello_timeout_s: float = 120.0  # a stream's hello must arrive within this (a client loads its model before it connects)
    idle_timeout_s: float = 900.0  # a stream with sessions that sends nothing for this long is closed

    @property
    def streams(self) -> int:
        """Streams open at once: every session's, and those waiting for their hello."""
        return self.max_sessions + self.max_pending


class SplitService:
    """The two RPCs: ``Session`` (a bidirectional stream of chunked frames) and ``Health``."""

    def __init__(self, server: Server | Host, tokens: dict[str, str] | None, limits: Limits | None = None, chunk_bytes: int = CHUNK_BYTES,
                 bindings: dict[str, int] | None = None):
        self.server = server if isinstance(server, Host) else Host(lambda bank: server)  # the runs it serves (one by default)
        self.link = ServerLink(self.server.handle, (limits or Limits()).frame)
        self.tokens = tokens
        self.bindings = bindings or {}  # client id -> the one client index it may take in a run
        self.limits = limits or Limits()
        self.chunk_bytes = chunk_bytes
        self.owner: dict[str, str] = {}  # session id -> client id
        self.stream_of: dict[str, object] = {}  # session id -> the gRPC context of the stream it was opened on
        self.client_certs = False  # mutual TLS: a client's id must be its certificate's (``start`` sets it)
        self._lock = threading.Lock()
        self.started = time.time()
        self.counts = {"sessions_opened": 0, "messages": 0, "bytes_in": 0, "bytes_out": 0, "refused": 0}
        self.pending = 0  # streams not yet through their hello
        self.watch = Watch()  # what the operator's dashboard shows (serve --dashboard)

    # -- authentication ---------------------------------------------------------------------------------
    def _client(self, context) -> str:
        meta = dict(context.invocation_metadata())
        client = meta.get("x-splittune-client", "anonymous")
        named = self._certificate_names(context) if self.client_certs else None
        if named and self.tokens is None and client == "anonymous":
            client = named[0]  # no tokens and no id claimed: the certificate says who this is
        if self.tokens is None:
            self._check_certificate(context, client, named)
            return client
        given = meta.get("authorization", "").removeprefix("Bearer ")
        expected = self.tokens.get(client)
        # compare in constant time, also for unknown ids, so timing tells nothing about which ids exist
        ok = hmac.compare_digest((expected or "\0" * 32).encode(), given.encode()) and expected is not None
        if not ok:
            self._event("refused", client=client, reason="bad token" if given else "no token")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"client {client!r} did not present a valid token")
        self._check_certificate(context, client, named)
        return client

    @staticmethod
    def _certificate_names(context) -> list[str]:
        """Who the client certificate says the client is: its common name, then its subject alternative names."""
        auth = context.auth_context()
        names = [v.decode(errors="replace") for key in ("x509_common_name", "x509_subject_alternative_name")
                 for v in auth.get(key, [])]
        return list(dict.fromkeys(names))

    def _check_certificate(self, context, client: str, named: list[str] | None) -> None:
        """With mutual TLS, a token is only good together with its client's certificate: bob's certificate
        with alice's token is bob claiming to be alice."""
        if not self.client_certs or client in (named or []):
            return
        held = f"for {named[0]!r}" if named else "without a name"
        self._abort(context, client, grpc.StatusCode.PERMISSION_DENIED,
                    f"the client certificate is {held}, but the session claims client id {client!r}; "
                    "a client connects with its own certificate and its own id (--client-id)")

    def _event(self, event: str, **fields) -> None:
        if event == "refused":
            self.counts["refused"] += 1
            self.watch.refused(fields.get("code"), fields.get("reason", ""))
        fields = {k: bounded(v, 200) if isinstance(v, str) else v for k, v in fields.items()}  # ids and reasons a client chose
        log.info(json.dumps({"event": event, "t": round(time.time(), 3), **fields}))

    # -- the session stream -------------------------------------------------------------------------------
    def session(self, requests, context):
        """One client's stream. A reader thread takes frames off the stream as they come, so the client
        may keep many in flight; they are handled here one by one, in order, and each reply carries its
        request's correlation id."""
        client = self._client(context)
        peer = context.peer()
        with self._lock:
            full = self.pending >= self.limits.max_pending
            self.pending += not full
        if full:
            self._abort(context, client, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{self.limits.max_pending} connections already wait for their hello; try again shortly")
        waiting = True  # counted in ``pending`` until its first hello is accepted
        self._event("connect", client=client, peer=peer)
        inbox: queue.Queue = queue.Queue()
        threading.Thread(target=_read_frames, args=(requests, inbox, self.limits.frame.max_frame_bytes), daemon=True).start()
        opened: set[str] = set()
        try:
            while True:
                try:
                    item = inbox.get(timeout=self.limits.hello_timeout_s if waiting else self.limits.idle_timeout_s)
                except queue.Empty:
                    self._abort(context, client, grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no hello within {self.limits.hello_timeout_s:g} s of connecting (serve --hello-timeout)"
                                if waiting else f"nothing received for {self.limits.idle_timeout_s:g} s (serve --idle-timeout); "
                                "the stream is closed, and the client's same command resumes its run")
                if item is None:
                    return
                if isinstance(item, ChunkError):
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED if "exceeds" in str(item) else grpc.StatusCode.INVALID_ARGUMENT
                    self._abort(context, client, code, str(item))
                corr, frame = item
                request, reply = self._handle(frame, client, context)
                if reply.kind == "hello":
                    opened.add(reply.session)
                    if waiting:
                        waiting = False
                        with self._lock:
                            self.pending -= 1
                out = self.link.reply(request, reply)
                self.watch.sent(request.session, len(out))
                self.counts["bytes_in"] += len(frame)
                self.counts["bytes_out"] += len(out)
                yield from chunks(out, self.chunk_bytes, corr)
        finally:  # the sessions of this stream end with it (the trained state stays with the server)
            with self._lock:
                self.pending -= waiting
                for session in opened:
                    self.owner.pop(session, None)
                    self.stream_of.pop(session, None)
                    self.link.close_session(session)
            self.server.disconnected(opened)
            self.watch.disconnected(opened)
            self._event("disconnect", client=client, peer=peer, sessions=sorted(opened))

    def _handle(self, frame: bytes, client: str, context) -> tuple[Parsed | Message, Message]:
        try:
            msg = self.link.decode(frame)
        except FrameError as err:
            self._abort(context, client, grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {err}")
        with self._lock:
            owner = self.owner.get(msg.session)
            if owner is not None and owner != client:
                self._abort(context, client, grpc.StatusCode.PERMISSION_DENIED,
                            f"session {msg.session!r} belongs to another client")
            if owner is None and msg.kind != "hello":
                self._abort(context, client, grpc.StatusCode.NOT_FOUND, f"unknown session {msg.session!r}; send hello first")
            bound = self.bindings.get(client)
            if msg.kind == "hello" and bound is not None and msg.meta.get("client") != bound:
                self._abort(context, client, grpc.StatusCode.PERMISSION_DENIED,
                            f"client {client!r} may only be client {bound} of a run (the server's tokens file binds it), "
                            f"not client {msg.meta.get('client')!r}")
            others = sorted({c for c in self.owner.values() if c != client})
            if msg.kind == "hello" and others and not self._room(msg, client):
                self._abort(context, client, grpc.StatusCode.RESOURCE_EXHAUSTED, self.server.full(others))
            stale = self._stale_stream(msg) if msg.kind == "hello" else None
            if stale is not None and stale is not context and stale.is_active():
                self._abort(context, client, grpc.StatusCode.ALREADY_EXISTS,
                            f"client {msg.meta.get('client')} of this run is still connected from another process; a "
                            "restarted client rejoins once its old process has ended")
            if owner is None and len(self.owner) >= self.limits.max_sessions:
                self._abort(context, client, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the server holds its maximum of {self.limits.max_sessions} sessions")
            clients = msg.meta.get("clients") if msg.kind == "hello" else None
            if isinstance(clients, int) and clients > self.limits.max_clients:
                self._abort(context, client, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"a run of {clients} clients is more than this server accepts (serve --max-clients "
                            f"{self.limits.max_clients})")
            if owner is None:  # admitted: the slot is this hello's from now on (checked and taken under one lock)
                self.owner[msg.session] = client
                self.stream_of[msg.session] = context
        started = time.perf_counter()
        try:
            msg = self.link.accept(msg, len(frame))
            reply = self.server.handle(msg, self._live(client)) if msg.kind == "hello" else self.server.handle(msg)
        except (ChainError, FrameError) as err:  # a chain the server cannot run, a crossing it cannot undo, a payload
            # that would expand past its codec's bound: the session stays usable
            reply = Message("error", msg.session, msg.step, msg.micro, meta={"reason": bounded(str(err)), "code": "INVALID_ARGUMENT"})
        except Exception as err:  # a fault of ours must not take the server down with it
            log.exception("handler failed")
            reply = Message("error", msg.session, msg.step, msg.micro, meta={"reason": f"internal error: {type(err).__name__}: {err}", "code": "INTERNAL"})
        if msg.kind == "hello":
            with self._lock:
                if reply.kind == "hello":
                    self.counts["sessions_opened"] += 1
                elif owner is None:  # refused: its slot is free again
                    self.owner.pop(msg.session, None)
                    self.stream_of.pop(msg.session, None)
        self.counts["messages"] += 1
        self.watch.message(msg.session, msg.kind, msg.step, len(frame), reply.kind == "error", client, msg.meta)
        fields = {"client": client, "session": msg.session, "kind": msg.kind, "step": msg.step, "micro": msg.micro,
                  "bytes_in": len(frame), "ms": round(1000 * (time.perf_counter() - started), 1)}
        if reply.kind == "error":
            fields.update(code=reply.meta.get("code"), reason=reply.meta.get("reason"))
        self._event("message", **fields)
        return msg, reply

    def _live(self, client: str):
        """Whether a session's client is connected, for a hello of ``client``: serving one run at a time, a client
        restarting its own run may replace its lingering sessions, and no one may replace another's run; serving
        several, a new run takes a slot only no connected client uses."""
        if self.server.max_runs == 1:
            return lambda session: self.owner.get(session, client) != client
        return lambda session: session in self.owner

    def _room(self, msg: Message, client: str) -> bool:
        """Whether a hello can be admitted now (inference sessions live beside whatever runs the server serves)."""
        if msg.meta.get("inference") is True:
            return True
        try:
            return self.server.room_for(SessionSpec.from_meta(msg.meta), self._live(client))
        except (TypeError, ValueError):
            return True  # a bad proposal: the server refuses it with the reason

    def _stale_stream(self, msg: Message):
        """The stream of the session a rejoining hello would replace (None: the hello does not rejoin)."""
        if msg.meta.get("inference") is True:
            return None
        try:
            stale = self.server.rejoining(SessionSpec.from_meta(msg.meta))
        except (TypeError, ValueError):
            return None  # a bad proposal, or a client that cannot rejoin: the server refuses it with the reason
        return self.stream_of.get(stale.session) if stale is not None else None

    def _abort(self, context, client: str, code, details: str):
        details = bounded(details, 500)
        self._event("refused", client=client, code=code.name, reason=details)
        context.abort(code, details)

    def health(self, request: bytes, context) -> bytes:
        group = self.server.group
        body = {"status": "SERVING", "uptime_s": round(time.time() - self.started, 1), "sessions": len(self.owner),
                "clients": group.n if group else 0, "joined": len(group.members) if group else 0,
                "schedule": group.schedule if group else None, **self.counts, **self.server.inference.health(),
                "peak_memory": peak_memory(self.server.device),  # the process's high-water marks (sizing, the benchmark)
                **self.server.health(lambda session: session in self.owner)}
        return json.dumps(body).encode()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler("splittune.Split", {
            "Session": grpc.stream_stream_rpc_method_handler(self.session),
            "Health": grpc.unary_unary_rpc_method_handler(self.health),
        })


@dataclass
class Tls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # mutual TLS: clients must present a certificate signed by this CA


def bind(listen: Address, tls: Tls | None, insecure: bool = False, max_streams: int = Limits().streams,
         workers: int | None = None) -> tuple[grpc.Server, Address]:
    """A gRPC server bound to ``listen``, not started (no handlers yet): ``serve`` binds before it loads its
    model, so a busy port or a bad certificate fails in a second. Refuses a plaintext listener on a
    non-loopback address unless ``insecure``. Returns the server and the address it listens on (port 0 in
    ``listen``: the port the kernel gave)."""
    from .files import check_server, read

    if tls is None and not is_loopback(listen.host) and not insecure:
        raise DeployError(
            f"refusing to listen on {listen.target} without TLS: give --tls-cert and --tls-key "
            "(splittune certs makes a test CA), or --insecure if the network is trusted"
        )
    if tls is not None:
        check_server(tls.cert, tls.key, tls.client_ca)
    options = [*KEEPALIVE, ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000), ("grpc.http2.max_ping_strikes", 0),
               ("grpc.max_receive_message_length", MAX_CHUNK_BYTES + 16),
               ("grpc.max_send_message_length", MAX_CHUNK_BYTES + 16), ("grpc.so_reuseport", 0)]
    # a thread per open stream, and a few that no stream can take, so Health answers however many are open
    server = grpc.server(ThreadPoolExecutor(max_workers=workers or max_streams + HEALTH_WORKERS), options=options,
                         maximum_concurrent_rpcs=max_streams + HEALTH_WORKERS)
    try:
        if tls is not None:
            creds = grpc.ssl_server_credentials(
                [(read(tls.key, "--tls-key"), read(tls.cert, "--tls-cert"))],
                root_certificates=read(tls.client_ca, "--tls-client-ca") if tls.client_ca else None,
                require_client_auth=tls.client_ca is not None,
            )
            port = server.add_secure_port(listen.target, creds)
        else:
            port = server.add_insecure_port(listen.target)
    except RuntimeError:  # gRPC raises "Failed to bind" where older versions returned 0
        port = 0
    if port == 0:
        server.stop(None)
        raise DeployError(f"cannot listen on {listen.target}: {_why_not_bound(listen)}")
    return server, replace(listen, port=port)


def _why_not_bound(listen: Address) -> str:
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(listen.host.strip("[]"), listen.port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return f"cannot resolve {listen.host!r}"
    family, kind, proto, _, where = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(where)
        except OSError as err:
            return {errno.EADDRINUSE: "the port is already in use (another splittune serve?)",
                    errno.EADDRNOTAVAIL: f"{listen.host} is not an address of this machine",
                    errno.EACCES: "permission denied (ports below 1024 need privileges)"}.get(err.errno, err.strerror or str(err))
    return "address in use or not available"


def release(server: grpc.Server) -> None:
    """Give back the port of a server from :func:`bind` that will not serve (gRPC keeps the port of a server
    that never started until the process exits)."""
    try:
        server.start()  # without handlers: a call in this instant is answered UNIMPLEMENTED
    except ValueError:  # already started
        pass
    server.stop(None).wait()


def start(service: SplitService, listen: Address, tls: Tls | None, insecure: bool = False, workers: int | None = None,
          bound: grpc.Server | None = None) -> grpc.Server:
    """Bind (unless ``bound`` is the server :func:`bind` made for the same ``listen`` and ``tls``), add the
    service and start. With mutual TLS, the service binds client ids to client certificates."""
    server = bound if bound is not None else bind(listen, tls, insecure, service.limits.streams, workers)[0]
    service.client_certs = tls is not None and tls.client_ca is not None
    server.add_generic_rpc_handlers((service.handler(),))
    server.start()
    return server


def _read_frames(requests, inbox: queue.Queue, max_frame_bytes: int) -> None:
    """Frames off a session's stream into ``inbox`` as they arrive; a chunk that breaks the framing ends it."""
    parts = Reassembler(max_frame_bytes)
    try:
        for chunk in requests:
            done = parts.add(chunk)
            if done is not None:
                inbox.put(done)
    except ChunkError as err:
        inbox.put(err)
        return
    except Exception:  # the stream ended under us (cancelled, reset): the handler loop ends too
        pass
    inbox.put(None)


def health(url: str, timeout_s: float = 5.0, ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> dict:
    """Ask a server how it is (for probes and ``splittune health``)."""
    from ..channels.transport import parse_server

    address = parse_server(url)
    if address.tls:
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        channel = grpc.secure_channel(address.target, grpc.ssl_channel_credentials(read(ca), read(key), read(cert)))
    else:
        channel = grpc.insecure_channel(address.target)
    with channel:
        reply = channel.unary_unary(HEALTH_METHOD, request_serializer=None, response_deserializer=None)(b"", timeout=timeout_s)
    return json.loads(reply)
