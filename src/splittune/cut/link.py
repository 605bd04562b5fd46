"""The cut link: every crossing of the cut goes party → link → chain → channel → chain → link → party.

:class:`CutLink` is the client's end: ``send(msg)`` returns a :class:`Pending` at once, keyed by
(step, micro-batch, kind), so many messages may be in flight while the client computes; replies may
complete in any order, and each is decoded when the client takes it. :class:`ServerLink` is the
server's end, the same for both channels: frame in, through the session's receiving chain, to the
server's handler, and the reply through its sending chain back to a frame.

Taps sit where an observer stands (DESIGN.md): a link's taps see each message as the receiving end's
chain delivers it (what the server sees, what the client sees) and the frame's size.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable

import torch

from ..channels import Channel, RemoteError, Tap
from ..threads import enrolled
from ..wire import FrameError, FrameLimits, Message, Parsed, decode_frame, encode_frame, parse_frame
from .chain import RAW_TERMS, Chain, Stopwatch, check_terms
from .transforms import ChainError

STATE = "chain/"  # tensors carrying one end's chain state (a checkpoint reply, a resuming hello)


class LinkStats:
    """What the client's crossings cost during one measured block (``CutLink.measured``): its codec time and waits,
    the server's reported time, round trips, and the codec's squared error and norm per direction."""

    def __init__(self):
        self.codec_s = 0.0
        self.wait_s = 0.0  # time the client spent blocked on replies
        self.server_s = 0.0  # the server's own time on these messages, as its replies report it
        self.round_trip_s = 0.0
        self.error = {"up": [0.0, 0.0], "down": [0.0, 0.0]}

    def add(self, codec_s: float = 0.0, wait_s: float = 0.0, server_s: float = 0.0, round_trip_s: float = 0.0,
            error: tuple[str, float, float] | None = None) -> None:
        self.codec_s += codec_s
        self.wait_s += wait_s
        self.server_s += server_s
        self.round_trip_s += round_trip_s
        if error is not None:
            direction, sq_err, sq_ref = error
            self.error[direction][0] += sq_err
            self.error[direction][1] += sq_ref

    def figures(self) -> dict[str, Any]:
        return {"codec_s": self.codec_s, "wait_s": self.wait_s, "server_s": self.server_s,
                "wire_s": max(self.round_trip_s - self.server_s, 0.0),
                "error": {d: (e[0] / e[1]) ** 0.5 if e[1] > 0 else None for d, e in self.error.items()}}


class Pending:
    """A message in flight; ``result()`` waits for its reply and decodes it (raising the server's refusal)."""

    def __init__(self, link: "CutLink", msg: Message, future, sent_at: float):
        self.link, self.msg, self.future, self.sent_at = link, msg, future, sent_at
        self._reply: Message | None = None

    def result(self) -> Message:
        if self._reply is None:
            link = self.link
            t0 = time.perf_counter()
            try:
                frame = self.link.channel.wait(self.future, self.msg)
            finally:
                link.note(wait_s=time.perf_counter() - t0)
            arrived = getattr(self.future, "arrived_at", None) or time.perf_counter()
            with Stopwatch() as watch:
                reply = link.chain.decode(frame) if link.chain is not None else decode_frame(frame)
            cut = reply.meta.pop("link", {}) if isinstance(reply.meta.get("link"), dict) else {}
            err = cut.get("down_err")
            link.note(codec_s=watch.total, round_trip_s=arrived - self.sent_at, server_s=float(cut.get("server_s", 0.0)),
                      error=("down", float(err[0]), float(err[1])) if err else None)
            link._observe("down", reply, len(frame))
            with link._lock:
                link.in_flight.pop((self.msg.step, self.msg.micro, self.msg.kind), None)
            if reply.kind == "error":
                raise RemoteError.of(reply)
            self._reply = reply
        return self._reply


class CutLink:
    """The client's end of the cut for one session over ``channel``; ``terms`` is its chain proposal."""

    def __init__(self, channel: Channel, session: str, terms: dict[str, list] | None = None, secret: int | None = None):
        self.channel = channel
        self.session = session
        self.terms = check_terms(terms or RAW_TERMS)
        self.secret = secret  # seeds this client's defenses in the chain; never sent
        self.chain: Chain | None = None  # built once the server accepts the terms
        self.in_flight: dict[tuple[int, int, str], Pending] = {}
        self.taps: list[Tap] = []
        self.sent_log: Callable[[Message, int], None] | None = None  # the client's ledger: each message as sent, its frame size
        self._measuring: list[LinkStats] = []  # the blocks being measured (``measured``)
        self._server_state: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def measured(self) -> contextlib.AbstractContextManager[LinkStats]:
        """What the crossings of the block cost, noted into a ``LinkStats`` of the block's own."""
        return enrolled(self._measuring, LinkStats(), self._lock)

    def note(self, **amounts) -> None:
        """Add a crossing's costs (``LinkStats.add``) to every block being measured."""
        with self._lock:
            for stats in self._measuring:
                stats.add(**amounts)

    @property
    def bytes_up(self) -> int:
        return self.channel.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.channel.bytes_down

    def add_tap(self, tap: Tap) -> None:
        self.taps.append(tap)

    def _observe(self, direction: str, msg: Message, nbytes: int) -> None:
        for tap in self.taps:
            tap(direction, msg, nbytes)

    def hello(self, meta: dict[str, Any], state: dict[str, torch.Tensor] | None = None,
              tensors: dict[str, torch.Tensor] | None = None) -> Message:
        """Stage 0: propose the session and the chain; the server's acceptance makes the chain the session's.
        ``state`` (from :meth:`state`) resumes both ends' chains: the server's end travels in the hello.
        ``tensors`` travel with the proposal (an inference session's server-side adapter)."""
        state = state or {}
        theirs = {f"{STATE}{k.removeprefix('server/')}": v for k, v in state.items() if k.startswith("server/")}
        msg = Message("hello", self.session, tensors={**(tensors or {}), **theirs}, meta={**meta, "chain": self.terms})
        frame = encode_frame(msg)
        self._observe("up", msg, len(frame))
        if self.sent_log is not None:
            self.sent_log(msg, len(frame))
        reply = Pending(self, msg, self.channel.request(frame), time.perf_counter()).result()
        self.chain = Chain(self.terms, "client", secret=self.secret)
        self.chain.load_state_dict({k.removeprefix("client/"): v for k, v in state.items() if k.startswith("client/")})
        self._server_state = {k.removeprefix(STATE): v for k, v in theirs.items()}
        return reply

    def keep_server_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """The server's end of the chain as it was at a checkpoint (its reply carries it)."""
        self._server_state = {k.removeprefix(STATE): v for k, v in tensors.items() if k.startswith(STATE)}

    def state(self) -> dict[str, torch.Tensor]:
        """Both ends' chain state for this client's checkpoint (error-feedback residuals)."""
        own = self.chain.state_dict() if self.chain is not None else {}
        return {**{f"client/{k}": v for k, v in own.items()}, **{f"server/{k}": v for k, v in self._server_state.items()}}

    def send(self, msg: Message) -> Pending:
        if self.chain is None:
            raise RuntimeError("say hello before sending")
        key = (msg.step, msg.micro, msg.kind)
        with self._lock:
            if key in self.in_flight:
                raise RuntimeError(f"a {msg.kind} message for step {msg.step} micro-batch {msg.micro} is already in flight")
        with Stopwatch() as watch:
            frame = self.chain.encode(msg)
        self.note(codec_s=watch.total)
        if self.sent_log is not None:
            self.sent_log(msg, len(frame))
        if self.taps:  # what the server's chain will hand the server
            self._observe("up", self.chain.decode(frame, "up"), len(frame))
        pending = Pending(self, msg, self.channel.request(frame), time.perf_counter())
        with self._lock:
            self.in_flight[key] = pending
        if self.chain.lossy:
            err = self.chain.codec_error()
            self.note(error=("up", err["sq_err"], err["sq_ref"]))
        return pending

    def call(self, msg: Message) -> Message:
        return self.send(msg).result()

    def close(self) -> None:
        self.channel.close()


class ServerLink:
    """The server's end of the cut, for every session: ``serve(frame) -> frame`` (the local channel), or
    ``receive`` / ``reply`` around the service's own checks (gRPC). One message of a session is handled at
    a time (each channel serves a session's frames in order)."""

    def __init__(self, handler: Callable[[Message], Message], limits: FrameLimits = FrameLimits()):
        self.handler = handler
        self.limits = limits
        self.chains: dict[str, Chain] = {}
        self.taps: list[Tap] = []
        self._proposed: dict[str, Chain] = {}
        self._down_err: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def add_tap(self, tap: Tap) -> None:
        self.taps.append(tap)

    def receive(self, frame: bytes) -> Message:
        """A frame as the server sees it, after the session's receiving chain. A malformed frame raises
        FrameError; a chain proposal the server cannot run, or a crossing it cannot undo, raises ChainError."""
        return self.accept(self.decode(frame), len(frame))

    def decode(self, frame: bytes) -> Parsed:
        """The frame's header validated, no tensor built yet: the service checks who owns the session in between,
        and ``accept`` decodes with that session's codecs."""
        started = time.perf_counter()
        parsed = parse_frame(frame, self.limits)
        parsed.received_at = started  # the server's time on a message runs from here to its reply
        return parsed

    def accept(self, parsed: Parsed, nbytes: int) -> Message:
        """A parsed frame decoded within its session's codecs (``Codec.max_ratio``: a few bytes cannot name a huge
        tensor), then through the session's receiving chain (a hello: its chain proposal checked)."""
        chain = self.chains.get(parsed.session) if parsed.kind != "hello" else None
        msg = parsed.decode(chain.codecs("up") if chain is not None else {})
        msg.received_at = parsed.received_at
        if msg.kind == "hello":
            chain = Chain(check_terms(msg.meta.pop("chain", RAW_TERMS)), "server", self.limits)
            saved = {k: msg.tensors.pop(k) for k in [k for k in msg.tensors if k.startswith(STATE)]}
            chain.load_state_dict({k.removeprefix(STATE): v for k, v in saved.items()})  # a resumed session's chain
            with self._lock:
                self._proposed[msg.session] = chain
        elif chain is not None:
            msg = chain.receive(msg)
        for tap in self.taps:
            tap("up", msg, nbytes)
        return msg

    def reply(self, request: Message, reply: Message) -> bytes:
        """The handler's reply through the session's sending chain (raw for the hello and for refusals),
        with the server's own time on the request (``meta["link"]``) and, on a step's reply, the step's
        downlink codec error."""
        session = request.session
        with self._lock:
            if request.kind == "hello":
                chain = self._proposed.pop(session, None)
                if reply.kind == "hello" and chain is not None:
                    self.chains[session] = chain
                    reply.meta["chain"] = chain.terms
            chain = self.chains.get(session)
            link: dict[str, Any] = {}
            if request.kind == "step" and session in self._down_err:
                link["down_err"] = self._down_err.pop(session)
            if request.kind == "checkpoint" and reply.kind != "error" and chain is not None:
                reply.tensors.update({f"{STATE}{k}": v for k, v in chain.state_dict().items()})  # the client keeps it
        started = getattr(request, "received_at", None)
        if started is not None:
            link["server_s"] = time.perf_counter() - started
        if reply.kind != "error":
            reply.meta["link"] = link
        raw = chain is None or reply.kind in ("error", "hello")
        frame = encode_frame(reply) if raw else chain.encode(reply)
        for tap in self.taps:  # what the server sends (its own view, before the client's chain)
            tap("down", reply, len(frame))
        if request.kind == "close" and reply.kind == "close":  # an inference session ended: its chain goes with it
            self.close_session(session)
        if raw:
            return frame
        if chain.lossy and request.step > 0:
            err = chain.codec_error()
            with self._lock:
                acc = self._down_err.setdefault(session, [0.0, 0.0])
                acc[0] += err["sq_err"]
                acc[1] += err["sq_ref"]
        return frame

    def refuse(self, session: str, reason: str, code: str = "INVALID_ARGUMENT") -> bytes:
        return encode_frame(Message("error", session, meta={"reason": reason, "code": code}))

    def serve(self, frame: bytes) -> bytes:
        """One request frame to one reply frame: every refusal becomes an error reply."""
        try:
            msg = self.receive(frame)
        except FrameError as err:
            return self.refuse("", f"malformed frame: {err}")
        except ChainError as err:
            return self.refuse("", str(err))
        return self.reply(msg, self.handler(msg))

    def close_session(self, session: str) -> None:
        with self._lock:
            for table in (self.chains, self._proposed, self._down_err):
                table.pop(session, None)
