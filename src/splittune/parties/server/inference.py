"""The server's inference sessions (split generation): this server's segment of a run's model, with that run's
server-side adapter, and a transformers KV cache for the blocks it runs.

A client opens one with a hello whose meta says ``inference`` (the session proposal of its run, plus the tensors
its server part trained), then sends ``generate`` messages: the activations of the positions that are new since
the last one, their columns of the attention mask and the position ids; the reply is the segment's output for
those positions (the activations at the top cut, or in the two-part split the head's raw logits). Only new
positions cross: the cache and the session's mask hold the rest.

Sessions live beside a training run and never join or reset it. They are bounded (``InferenceLimits``: how many at
once, and the bytes their caches hold together) and freed on ``close``, when their stream disconnects, or after
``timeout_s`` without a message. Sessions whose runs propose the same segment and adapter share one copy of it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from ... import workers
from ...averaging import add_delta
from ...device import to_device
from ...models.adapters import AdapterError, load_trainable_state, lora_layers, trainable
from ...models.arch import ArchSpec, generation_refusal
from ...models.partition import PlanError
from ...models.segment import run_segment
from ...models.stages import segment_failures
from ...models.zoo import ModelSource
from ...wire.names import FOLD, split
from ..party import Party, SessionSpec
from ...wire import Message
from ..protocol import INFERENCE_SCHEMAS, GenerateMeta, ProtocolError, hidden_in, parse_meta



@dataclass
class InferenceLimits:
    max_sessions: int = 16  # inference sessions held at once
    max_bytes: int = 4 << 30  # the KV caches of every inference session together
    timeout_s: float = 600.0  # a session idle this long is freed


@dataclass
class _Model:
    party: Party
    users: set[str] = field(default_factory=set)


@dataclass
class _Session:
    key: str
    model: _Model
    head: bool  # two-part: this segment ends the model (the reply is the head's logits)
    start: int
    end: int
    cache: DynamicCache | None = None
    positions: int = 0  # what the cache holds
    mask: torch.Tensor | None = None  # the attention mask of those positions (each message brings its new columns)
    rows: int = 0
    bytes: int = 0
    last: float = field(default_factory=time.monotonic)


def cache_bytes(cache: DynamicCache | None) -> int:
    """Bytes a transformers cache holds (keys and values, and conv/recurrent states of linear-attention layers)."""
    if cache is None:
        return 0
    seen, total = set(), 0
    for layer in getattr(cache, "layers", []):
        for value in vars(layer).values():
            items = value.values() if isinstance(value, dict) else (value,)
            for t in items:
                if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which the model's forward takes its cache (``cache`` in transformers 5, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _digest(session: SessionSpec, tensors: dict[str, torch.Tensor]) -> str:
    """Sessions with the same key run the very same segment: same proposal (but who proposed it) and adapter."""
    terms = {k: v for k, v in session.to_meta().items() if k not in ("client", "samples", "model", "clients", "run_id")}
    h = hashlib.sha256(json.dumps(terms, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _sweep_every(sessions: "weakref.ref[InferenceSessions]", stop: threading.Event, period: float) -> None:
    while not stop.wait(period):
        owner = sessions()
        if owner is None:
            return
        owner.sweep()
        del owner


class InferenceSessions:
    """Every inference session of one server. ``run`` is the server's compute queue (``TrunkEngine.run``): inference
    computes there too, so it never interleaves with a training job on the same thread pool."""

    def __init__(self, source: ModelSource, spec: ArchSpec, config, device: torch.device, run, limits: InferenceLimits | None = None):
        self.source, self.spec, self.config, self.device, self.run = source, spec, config, device, run
        self.limits = limits or InferenceLimits()
        self.sessions: dict[str, _Session] = {}
        self.models: dict[str, _Model] = {}
        self._lock = threading.Lock()
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()

    def _start_sweeper(self) -> None:
        """Idle sessions are freed on time even when no message comes (a thread that wakes a few times per timeout)."""
        if self._sweeper is None:
            stop, me = self._stop, weakref.ref(self)
            period = min(max(self.limits.timeout_s / 4, 0.01), 30.0)
            self._sweeper = workers.start(_sweep_every, (me, stop, period), "splittune-inference-sweep", stop.set)

    def stop(self) -> None:
        self._stop.set()

    def holds(self, session: str) -> bool:
        return session in self.sessions

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in list(self.sessions.values()))

    def health(self) -> dict:
        return {"inference_sessions": len(self.sessions), "inference_bytes": self.bytes, "inference_models": len(self.models)}

    # -- open and close -------------------------------------------------------------------------------------
    def open(self, session_id: str, session: SessionSpec, tensors: dict[str, torch.Tensor]) -> dict:
        self.sweep()
        if session_id in self.sessions:
            raise ProtocolError(f"inference session {session_id!r} is already open", "ALREADY_EXISTS")
        plan = session.plan(self.spec.n_blocks)
        if plan.shape == "centralized":
            raise ProtocolError("a centralized run has no server part to generate with")
        refusal = generation_refusal(self.config)
        if refusal:
            raise ProtocolError(refusal, "UNIMPLEMENTED")
        segments = plan.party_segments("server")
        blocks = [i for s in segments for i in s.blocks]
        start, end = blocks[0], blocks[-1] + 1
        for name, t in tensors.items():
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise ProtocolError(f"adapter tensor {name!r} must be floating and finite")
        key = _digest(session, tensors)
        self._start_sweeper()
        with self._lock:
            if len(self.sessions) >= self.limits.max_sessions:
                raise ProtocolError(f"the server holds its maximum of {self.limits.max_sessions} inference sessions; "
                                    "close one (or wait for idle ones to time out)", "RESOURCE_EXHAUSTED")
            model = self.models.get(key)
        if model is None:
            model = _Model(self.run(self._build, session, tensors))
            with self._lock:
                model = self.models.setdefault(key, model)
        with self._lock:
            if len(self.sessions) >= self.limits.max_sessions:  # another open won the last place meanwhile
                self._release(key, session_id)
                raise ProtocolError(f"the server holds its maximum of {self.limits.max_sessions} inference sessions",
                                    "RESOURCE_EXHAUSTED")
            model.users.add(session_id)
            self.sessions[session_id] = _Session(key, model, head=segments[-1].head, start=start, end=end)
        party = model.party
        return {"blocks": [start, end], "params": party.weights.params, "bytes": party.weights.bytes, "device": str(party.device),
                "max_bytes": self.limits.max_bytes, "timeout_s": self.limits.timeout_s}

    def _build(self, session: SessionSpec, tensors: dict[str, torch.Tensor]) -> Party:
        """This server's segment of the run with its trained tensors in place (folded updates added to base weights)."""
        try:
            party = Party("server", self.source, self.spec, session, self.config, device=self.device)
        except (PlanError, AdapterError) as err:
            raise ProtocolError(f"cannot build the run's server part: {err}") from None
        tensors = to_device(tensors, party.device)
        state, folds = split(FOLD, tensors)
        expected = {name for name, _ in trainable(party.model)}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if not tensors:  # none sent: the adapters as initialised (LoRA B = 0), the base model's segment
            missing = []
        if missing or unexpected:
            raise ProtocolError(f"the adapter sent does not fit the run's server part (blocks {party.segments[0].blocks.start}.."
                                f"{party.segments[-1].blocks.stop - 1}): missing {missing[:3]}, unexpected {unexpected[:3]}")
        try:
            load_trainable_state(party.model, state, partial=not tensors)
        except AdapterError as err:
            raise ProtocolError(str(err)) from None
        layers = lora_layers(party.model)
        with torch.no_grad():
            for module, delta in folds.items():
                if module not in layers:
                    raise ProtocolError(f"folded update {FOLD}{module} names no LoRA module of the run's server part")
                add_delta(layers[module].get_base_layer().weight, delta, layers[module].fan_in_fan_out)
        party.model.eval()
        return party

    def answer(self, msg: Message) -> Message:
        """The reply to an inference session's ``generate`` or ``close`` message."""
        meta = parse_meta(msg.kind, msg.meta, INFERENCE_SCHEMAS)
        if msg.kind == "close":
            if not self.close(msg.session):
                raise ProtocolError(f"unknown inference session {msg.session!r}", "NOT_FOUND")
            return Message("close", msg.session, msg.step, msg.micro, {}, {"closed": True})
        return Message("generate", msg.session, msg.step, msg.micro, self.step(msg.session, msg.tensors, meta), {})

    def close(self, session_id: str) -> bool:
        with self._lock:
            s = self.sessions.pop(session_id, None)
            if s is None:
                return False
            self._release(s.key, session_id)
            return True

    def _release(self, key: str, session_id: str) -> None:
        model = self.models.get(key)
        if model is not None:
            model.users.discard(session_id)
            if not model.users:
                del self.models[key]

    def sweep(self) -> list[str]:
        """Free the sessions idle longer than the limit; their ids."""
        now = time.monotonic()
        idle = [sid for sid, s in list(self.sessions.items()) if now - s.last > self.limits.timeout_s]
        for sid in idle:
            self.close(sid)
        return idle

    # -- one forward ----------------------------------------------------------------------------------------
    def step(self, session_id: str, tensors: dict[str, torch.Tensor], meta: GenerateMeta) -> dict[str, torch.Tensor]:
        self.sweep()
        s = self.sessions.get(session_id)
        if s is None:
            raise ProtocolError(f"unknown inference session {session_id!r} (closed, timed out, or never opened); "
                                "open one with an inference hello", "NOT_FOUND")
        s.last = time.monotonic()
        party = s.model.party
        tensors = to_device(tensors, party.device)
        text = self.config.get_text_config()
        hidden = hidden_in(tensors, "generate", "hidden", text.hidden_size, party.dtype, f"position {meta.start}")
        rows, new = hidden.shape[:2]
        if meta.start not in (0, s.positions):
            raise ProtocolError(f"cache position out of order: this session's cache holds {s.positions} positions, "
                                f"the message starts at {meta.start} (0 starts a new sequence)", "FAILED_PRECONDITION")
        if meta.start and rows != s.rows:
            raise ProtocolError(f"the sequence has {s.rows} rows; this message has {rows} (start at 0 for a new batch)")
        # the new positions' columns of the attention mask; the session holds the earlier ones. Absent when the
        # client's forward has none (Mamba's after the prompt): the segment then gets none either
        mask = tensors.get("attention_mask")
        if mask is not None and (mask.dtype != torch.int64 or tuple(mask.shape) != (rows, new)):
            raise ProtocolError(f"attention_mask must be int64 of shape [{rows}, {new}] (the new positions' columns), "
                                f"or absent, got {mask.dtype} {list(mask.shape)}")
        if mask is not None and not ((mask == 0) | (mask == 1)).all():
            raise ProtocolError("attention_mask may hold only 0 and 1")
        if mask is not None and meta.start:
            if s.mask is None:
                raise ProtocolError("attention_mask: this sequence's earlier positions came without one; send it from "
                                    "the start of the sequence (start 0) or not at all")
            mask = torch.cat([s.mask, mask], dim=1)
        positions = tensors.get("position_ids")
        if positions is not None and (positions.dtype != torch.int64 or tuple(positions.shape) not in ((rows, new), (1, new))):
            raise ProtocolError(f"position_ids must be int64 of shape [{rows}, {new}], got {positions.dtype} {list(positions.shape)}")
        if meta.keep is not None and not s.head:
            raise ProtocolError("meta field 'keep' asks for logits, but this session's segment does not end the model")
        per_position = s.bytes / max(s.positions, 1) if meta.start else 0.0
        others = self.bytes - (s.bytes if meta.start else 0)
        if others + per_position * (meta.start + new) > self.limits.max_bytes:
            raise ProtocolError(f"inference caches would exceed this server's cap of {self.limits.max_bytes} bytes "
                                f"({others} held by other sessions); close sessions or ask for fewer positions", "RESOURCE_EXHAUSTED")
        out = self.run(self._forward, s, hidden, mask, positions, meta)
        s.positions, s.rows, s.bytes, s.last = meta.start + new, rows, cache_bytes(s.cache), time.monotonic()
        s.mask = mask
        if self.bytes > self.limits.max_bytes:  # the first forward of a sequence, larger than any estimate allowed
            self.close(session_id)
            raise ProtocolError(f"the session's cache ({s.bytes} bytes) exceeds this server's cap of {self.limits.max_bytes} bytes "
                                "with the others; the session is closed", "RESOURCE_EXHAUSTED")
        return out

    def _forward(self, s: _Session, hidden, mask, positions, meta: GenerateMeta) -> dict[str, torch.Tensor]:
        party = s.model.party
        base = party.model.get_base_model() if hasattr(party.model, "get_base_model") else party.model
        if meta.start == 0:
            s.cache = DynamicCache(config=base.config)
        forward = {cache_argument(base): s.cache, "use_cache": True, "position_ids": positions}
        if meta.keep is not None:
            forward["logits_to_keep"] = meta.keep
        if party.router is not None:
            forward["output_router_logits"] = False
        raw: dict[str, torch.Tensor] = {}
        handle = None
        if s.head:  # the head's own output: the client's model applies what follows it (scaling, soft-capping) itself
            handle = base.get_output_embeddings().register_forward_hook(lambda m, i, o: raw.__setitem__("logits", o))
        try:
            with torch.no_grad(), segment_failures(party, s.start, s.end, head=s.head):
                out = run_segment(party.model, party.blocks, s.start, s.end, attention_mask=mask, hidden=hidden, post=party.post,
                                  head=s.head, want_logits=s.head, forward_kwargs=forward)
        except BaseException:
            s.cache, s.positions, s.mask = None, 0, None  # a half-updated cache is useless: the next message must start afresh
            raise
        finally:
            if handle is not None:
                handle.remove()
        return {"logits": raw["logits"]} if s.head else {"hidden": out.hidden}
