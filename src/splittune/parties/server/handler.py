"""The server party's protocol handler: stage 3 (trunk forward, and in the two-part split the rest of
the model and the loss), its half of stage 5 (backward to the cut), and stage 7 (the adapter average)
for the clients it serves. It learns the run from the clients' hellos; the group forms when every
client has said hello.

A message is validated first (its typed meta, ``protocol.py``; then every tensor: shape, dtype,
finiteness, label range), then one handler per kind waits for the client's turn or round if the
schedule asks it to, then hands the computation to the trunk engine (``engine.py``). A refusal is an
``error`` message with the reason and a gRPC status name, and the server's state is left as it was.
"""

from __future__ import annotations

import logging
import json
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from ...device import to_device
from ...models.arch import ArchSpec
from ...models.routing import ROUTER
from ...models.stages import StageError
from ...models.sharing import FrozenBank
from ...models.zoo import ModelSource
from ...wire import Message
from ...wire.names import FOLD, tag
from .arrivals import arrived
from ..cache import ActivationCache
from .engine import Rows, TrunkEngine
from .group import Group, Member
from .meet import WaitTimeout
from ..party import SessionSpec
from .inference import InferenceLimits, InferenceSessions
from .proposal import read_proposal
from .secure_handlers import SecureAggregation
from ..protocol import INFERENCE_SCHEMAS, ProtocolError, bounded, hidden_in, labels_in, mask_in, parse_meta, router_in, scores_in, status_of

log = logging.getLogger("splittune.serve")


REFUSED = (ProtocolError, ValueError, WaitTimeout)  # what a request is answered with an error message for
REMEMBER_ENDED = 256  # replaced sessions whose end the server can still explain


class Server(SecureAggregation):
    """``policies`` maps schedule names to their policy objects (``schedules.POLICIES``: this layer
    cannot import the policies, which sit above it); ``max_cache_bytes`` caps the activation cache a
    client may ask for (None: what the client asks); ``inference`` bounds the inference sessions served beside
    training (``parties/server/inference.py``); ``quantize`` fixes how the trunk's frozen weights are stored."""

    def __init__(self, source: ModelSource, spec: ArchSpec, config=None, wait_s: float = 600.0, state_dir: Path | None = None,
                 device: torch.device | None = None, *, policies: Mapping, max_cache_bytes: int | None = None,
                 inference: InferenceLimits | None = None, quantize: str | None = None, bank: FrozenBank | None = None,
                 spans=None):
        self.source = source
        self.bank = bank  # frozen weights shared with the other runs of this process (``host.py``), or None
        self.spans = spans  # a ``spans.SpanMaker`` when the trunk is cut into spans elsewhere (``ray.trunk_spans``), or None
        self.quantize = quantize  # serve --quantize: the trunk's quantization, fixed for every client (None: theirs)
        self.device = device if device is not None else torch.device("cpu")
        self.spec = spec
        self.config = config if config is not None else source.config()
        text = self.config.get_text_config()
        self.width, self.vocab = text.hidden_size, text.vocab_size
        self.fingerprint = source.fingerprint()
        self.wait_s = wait_s
        self.policies = policies
        self.state_dir = state_dir  # checkpoints of the server's part, one folder per run
        self.max_cache_bytes = max_cache_bytes
        self.group: Group | None = None
        self.sessions: dict[str, Member] = {}
        # sessions a later hello replaced: why, and the step a restarted client rejoined from (its peers resume from
        # there), or None (the newest REMEMBER_ENDED)
        self.ended: dict[str, tuple[str, int | None]] = {}
        self._lock = threading.Lock()
        self.engine = TrunkEngine()
        self.inference = InferenceSessions(source, spec, self.config, self.device, self.engine.run, inference)
        self._handlers = {"activations": self._activations, "gradients": self._gradients, "step": self._step,
                          "state": self._state, "global": self._global, "aggregate": self._aggregate,
                          "checkpoint": self._checkpoint, "relay_put": self._relay_put, "relay_get": self._relay_get,
                          "secagg_keys": self._secagg_keys, "secagg_shares": self._secagg_shares, "secagg_unmask": self._secagg_unmask}

    @property
    def party(self):
        return self.group.party if self.group else None

    def cancel(self, reason: str) -> None:
        """Call off every wait of the current run (turns, batches, averages) with ``reason``."""
        if self.group is not None:
            self.group.meet.cancel(reason)
            if self.group.turns is not None:
                self.group.turns.cancel(reason)

    def close(self) -> None:
        self.inference.stop()
        self.engine.close()

    def disconnected(self, sessions) -> None:
        """A client's stream ended: its inference sessions end with it (a training run's state stays)."""
        for session in sessions:
            self.inference.close(session)

    # -- dispatch -----------------------------------------------------------------------------------
    def handle(self, msg: Message) -> Message:
        try:
            if msg.kind == "hello":
                return self._open_inference(msg) if msg.meta.get("inference") is True else self._hello(msg)
            if msg.kind in INFERENCE_SCHEMAS or self.inference.holds(msg.session):
                return self.inference.answer(msg)
            member = self.sessions.get(msg.session)
            if member is None and msg.session in self.ended:
                raise ProtocolError(f"session {bounded(repr(msg.session), 80)} has ended: {self.ended[msg.session][0]}", "ABORTED")
            if member is None:
                raise ProtocolError(f"unknown session {msg.session!r}; send hello first", "NOT_FOUND")
            if member.index in self.group.dropped:
                raise ProtocolError(f"client {member.index} was given up after missing a round; the run went on without it",
                                    "FAILED_PRECONDITION")
            meta = parse_meta(msg.kind, msg.meta)
            if self.party is not None:  # tensors arrive on the CPU; the model may be elsewhere
                msg.tensors = to_device(msg.tensors, self.party.device)
            return self._handlers[msg.kind](member, msg, meta)
        except REFUSED as err:
            return self.refusal(msg, err)

    def refusal(self, msg: Message, err: Exception) -> Message:
        """The error reply to ``msg``: the reason and its status (and, after a peer rejoined, the step to resume from)."""
        if isinstance(err, StageError):  # the model failed inside, not the message: the operator needs the traceback
            log.warning("%s", err, exc_info=err)
        meta = {"reason": bounded(str(err)), "code": status_of(err)}
        rejoin = self.ended.get(msg.session, ("", None))[1]
        if rejoin is not None:  # a peer restarted and rejoined: this client resumes from the step it came back at
            meta.update(code="ABORTED", rejoin=rejoin)
        return Message("error", msg.session, msg.step, msg.micro, meta=meta)

    def _reply(self, msg: Message, kind: str, tensors=None, **meta) -> Message:
        return Message(kind, msg.session, msg.step, msg.micro, tensors or {}, meta)

    # -- session --------------------------------------------------------------------------------------
    def _proposal(self, msg: Message) -> SessionSpec:
        return read_proposal(msg.meta, self.fingerprint, self.source.describe, self.quantize)

    def _open_inference(self, msg: Message) -> Message:
        """An inference session beside any training run (``parties/server/inference.py``); the hello's tensors are what the
        run's server part trained."""
        session = self._proposal(msg)
        if msg.session in self.sessions:
            raise ProtocolError(f"session {msg.session!r} is a training session; an inference session needs its own id", "ALREADY_EXISTS")
        info = self.inference.open(msg.session, session, dict(msg.tensors))
        return self._reply(msg, "hello", accepted=True, inference=True, **info)

    def _hello(self, msg: Message) -> Message:
        session, resume = self.proposed(msg)
        group, member, stale = self.admit(msg, session, resume)
        return self.welcome(msg, group, member, stale, resume)

    def proposed(self, msg: Message) -> tuple[SessionSpec, int | None]:
        """A training hello's proposal and the step it resumes from, checked against what this server can run."""
        session = self._proposal(msg)
        if session.schedule not in self.policies:
            raise ProtocolError(f"unknown schedule {session.schedule!r}; schedules: {', '.join(self.policies)}")
        plan = session.plan(self.spec.n_blocks)
        if plan.shape == "centralized" and self.policies[session.schedule].server_part:
            raise ProtocolError("a centralized run has no server part")
        if not isinstance(session.cache_bytes, int) or isinstance(session.cache_bytes, bool) or session.cache_bytes < 0:
            raise ProtocolError(f"bad session proposal: cache_bytes must be a byte count (an integer >= 0), got {session.cache_bytes!r}")
        resume = msg.meta.get("resume")
        if resume is not None and (not isinstance(resume, int) or isinstance(resume, bool) or resume < 1):
            raise ProtocolError(f"resume must be a completed step (a positive integer), got {resume!r}")
        return session, resume

    def admit(self, msg: Message, session: SessionSpec, resume: int | None, fresh: bool | None = None) -> tuple[Group, Member, Member | None]:
        """Enter the hello's client into the run it starts, joins or rejoins (``fresh``: whether it starts one, when the
        caller placed it; by default a hello starts a run unless one is forming): its group, its member, the stale member
        it replaces."""
        with self._lock:
            stale = self.rejoining(session)
            if stale is not None and self.group.formed:
                self._roll_back(session, resume)
            elif stale is None and (self._fresh_run(session) if fresh is None else fresh):
                self.group = Group(session, self.wait_s, self.policies)
                self._end_sessions(self.sessions, "a new run started on this server (a newer hello, from this client id "
                                                  "or another, replaced it)")
                self.engine.run(self.engine.reset, None, False)
            group = self.group
            group.check(session, rejoining=stale is not None)
            member = Member(session.client, msg.session, session, last_step=resume or 0)
            budget = session.cache_bytes if self.max_cache_bytes is None else min(session.cache_bytes, self.max_cache_bytes)
            member.cache = ActivationCache(budget) if budget > 0 else None
            self._end_sessions({s: m for s, m in self.sessions.items() if m.index == session.client},
                               f"client {session.client} of this run said hello again from another session (a second "
                               "process with the same client index, or a restart), which replaced this one")
            group.members[session.client] = member
            self.sessions[msg.session] = member
        return group, member, stale

    def welcome(self, msg: Message, group: Group, member: Member, stale: Member | None, resume: int | None) -> Message:
        """Wait until every client of the run said hello (the group forms then), and answer with what was agreed."""
        group.meet.meet("hello", member.index, resume, set(range(group.n)), lambda items: self._form(group, items),
                        replace=stale is not None)
        party = group.party
        info = {"accepted": True, "clients": group.n, "schedule": group.schedule, "checkpoints": self.state_dir is not None,
                "cache_bytes": member.cache.max_bytes if member.cache is not None else 0}
        if party is not None:
            info.update(blocks=[member.start, member.end], params=party.weights.params, bytes=party.weights.bytes,
                        trainable=party.trainable_params, fan_in_fan_out=party.fan_in_fan_out, device=str(party.device))
        return self._reply(msg, "hello", **info)

    def _end_sessions(self, sessions: dict[str, Member], why: str, rejoin: int | None = None) -> None:
        """Forget ``sessions``, remembering why, so a client still using one is told what happened, not 'unknown'
        (and, after a peer rejoined, from which step it resumes)."""
        for sid in list(sessions):
            self.sessions.pop(sid, None)
            self.ended[sid] = (why, rejoin)
        while len(self.ended) > REMEMBER_ENDED:
            self.ended.pop(next(iter(self.ended)))

    def starts_new_run(self, session: SessionSpec) -> bool:
        """Whether this hello starts a new run (the server serves one run at a time) rather than joining one (or
        rejoining it: a restarted client of the run being served)."""
        return self.rejoining(session) is None and self._fresh_run(session)

    def _fresh_run(self, session: SessionSpec) -> bool:
        return self.group is None or session.clients == 1 or len(self.group.members) == self.group.n

    def rejoining(self, session: SessionSpec) -> Member | None:
        """The stale member a restarted client of the run being served replaces: same run id, same index, same terms
        (None for a hello that starts or joins a run). A client given up after missing a round cannot come back: the
        run went on without it."""
        group = self.group
        member = group.members.get(session.client) if group is not None and session.clients > 1 else None
        if member is None or not session.run_id or member.spec.run_id != session.run_id or group.terms != session.shared_terms():
            return None
        if session.client in group.dropped:
            raise ProtocolError(f"client {session.client} was given up after missing a round and the run went on without it; "
                                "it cannot rejoin (start a new run, with a new --out, to train again)", "FAILED_PRECONDITION")
        return member

    def _roll_back(self, session: SessionSpec, resume: int | None) -> None:
        """A restarted client rejoins a run under way: the run goes back to the step it resumes from (its last
        checkpoint, which every party keeps). Every other client's session ends with that step (``ABORTED``, meta
        ``rejoin``), at once: the waits of the old run are called off rather than left to time out."""
        step = resume or 0
        why = (f"client {session.client} of this run restarted and rejoined it from "
               + (f"its checkpoint at step {step}" if step else "the start") + "; every client resumes from there")
        old = self.group
        log.warning(json.dumps({"event": "rejoin", "client": session.client, "step": step}))
        self._end_sessions(self.sessions, why, rejoin=step)
        self.group = Group(session, self.wait_s, self.policies)
        old.meet.cancel(why)
        if old.turns is not None:
            old.turns.cancel(why)
        self.engine.run(self.engine.reset, None, False)

    def _form(self, group: Group, items: dict) -> dict:
        group.formed = True  # every client said hello: a client saying it again now rejoins a run under way
        self.engine.run(group.form, self.source, self.spec, self.config, self.device, self.bank, self.spans)
        self.engine.run(self.engine.reset, group.party, group.batched)
        resumes = set(items.values())
        if len(resumes) > 1:
            raise ProtocolError(f"clients resume from different steps {sorted(map(str, resumes))}; resume them all from one checkpoint",
                                "FAILED_PRECONDITION")
        step = resumes.pop()
        if step is not None:
            self.engine.run(self._restore, group, step)
        return {i: None for i in items}

    # -- checkpoints (what the group holds: group.py) -------------------------------------------------------
    def _save(self, group: Group, step: int) -> dict:
        group.save(self.state_dir, step)
        return {i: None for i in group.members}

    def _restore(self, group: Group, step: int) -> None:
        group.restore(self.state_dir, step)

    # -- turns ------------------------------------------------------------------------------------------
    def _needs_party(self, msg: Message) -> None:
        if self.party is None:
            raise ProtocolError(f"a {self.group.schedule} run has no server part; {msg.kind} messages are not served")

    def _turn(self, member: Member, msg: Message) -> None:
        self.group.check_sampled(member.index, msg.kind, msg.step)
        if self.group.turns is not None:
            self.group.turns.enter(member.index, msg.step, self._give_up_turn)

    def _give_up_turn(self, client: int) -> None:
        """A client vanished in its turn: forget its half-done step (pending forwards, gradients it left on
        the shared adapter) so the next client's step is its own."""
        self.group.drop(client, "its turn outlasted the wait")
        self.engine.run(self.engine.forget, client, self.group.members[client].adapter)

    def _router_sums(self, msg: Message, rows: int, sent: bool | None) -> torch.Tensor | None:
        """The router sums (or their gradient) a message carries (``models/routing.py``): ``sent`` True requires them,
        False refuses them, None takes them if present (a bottom of dense blocks, or none, runs no router)."""
        router = self.party.router
        if router is None or sent is False:
            if ROUTER in msg.tensors:
                why = "this model adds no router loss" if router is None else "this stage returns none"
                raise ProtocolError(f"{msg.kind} message carries tensor {ROUTER!r}, but {why}")
            return None
        if sent is None and ROUTER not in msg.tensors:
            return None
        return router_in(msg.tensors, msg.kind, rows, router.experts, f"step {msg.step}, micro-batch {msg.micro}")

    def _hidden(self, msg: Message, name: str = "hidden") -> torch.Tensor:
        return hidden_in(msg.tensors, msg.kind, name, self.width, self.party.dtype, f"step {msg.step}, micro-batch {msg.micro}")

    # -- stages 3 and 5 -------------------------------------------------------------------------------------
    def _activations(self, member: Member, msg: Message, meta) -> Message:
        self._needs_party(msg)
        if meta.train:
            self._turn(member, msg)
        hidden, commit = arrived(msg, meta, member.cache, self.width, self.party.dtype, self.party.device) if meta.cache \
            else (self._hidden(msg), lambda: None)
        mask = mask_in(msg.tensors, hidden.shape)
        labels = labels_in(msg.tensors, hidden.shape, self.vocab) if member.head else None
        scores = scores_in(meta, hidden.shape, self.vocab)
        sums = self._router_sums(msg, hidden.shape[0], sent=None if member.head and meta.train else False)
        commit()
        engine, group = self.engine, self.group
        if meta.train and group.batched:
            item = Rows(hidden, mask, labels, meta.num_items, meta.want_grad, sums, meta.loss_scale)
            kind, tensors, extra = group.meet.meet(
                ("forward", msg.step, msg.micro), member.index, item, group.expected(msg.step),
                lambda items: engine.run(engine.forward_together, msg.step, msg.micro, items, group.members, self.vocab), group.drop)
            return self._reply(msg, kind, tensors, **extra)
        if member.head:
            loss, grads, scored = engine.run(engine.head, member.adapter, member.start, member.end, hidden, mask, labels,
                                             meta.num_items, meta.train, meta.want_grad, scores, sums, meta.loss_scale)
            if not meta.train:
                return self._reply(msg, "activations", {} if scored is None else {"scores": scored}, loss=loss)
            return self._reply(msg, "gradients", grads, loss=loss)
        out, trunk_sums = engine.run(engine.forward, (member.index, msg.step, msg.micro), member.adapter, member.start, member.end,
                                     hidden, mask, meta.train)
        return self._reply(msg, "activations", {"hidden": out} if trunk_sums is None else {"hidden": out, ROUTER: trunk_sums})

    def _gradients(self, member: Member, msg: Message, meta) -> Message:
        self._needs_party(msg)
        self._turn(member, msg)
        engine, group = self.engine, self.group
        grad = self._hidden(msg, "grad")
        missing = ProtocolError(f"gradients for step {msg.step} micro-batch {msg.micro}, which has no pending forward", "FAILED_PRECONDITION")
        if group.batched:
            batch = engine.batch_of(msg.step, msg.micro, member.index)
            if batch is None:
                raise missing
            expected = (batch.rows[batch.clients.index(member.index)], *batch.hidden_out.shape[1:])
            if tuple(grad.shape) != expected:
                raise ProtocolError(f"gradient of shape {tuple(grad.shape)} for activations of shape {expected}")
            item = (grad, self._router_sums(msg, expected[0], sent=batch.router is not None))
            grads = group.meet.meet(("backward", msg.step, msg.micro), member.index, item, group.expected(msg.step),
                                    lambda items: engine.run(engine.backward_together, msg.step, msg.micro, items, group.members), group.drop)
            return self._reply(msg, "gradients", {"grad": grads} if meta.want_grad else {})
        key = (member.index, msg.step, msg.micro)
        pending = engine.pending.get(key)
        if pending is None:
            raise missing
        if grad.shape != pending.hidden_out.shape:
            raise ProtocolError(f"gradient of shape {tuple(grad.shape)} for activations of shape {tuple(pending.hidden_out.shape)}")
        sums_grad = self._router_sums(msg, grad.shape[0], sent=pending.router is not None)
        grad_in = engine.run(engine.backward, key, member.adapter, grad, sums_grad)
        return self._reply(msg, "gradients", {"grad": grad_in} if meta.want_grad else {})

    def _step(self, member: Member, msg: Message, meta) -> Message:
        self._needs_party(msg)
        if not member.last_step < msg.step <= member.spec.steps:  # a replayed or reordered step would move the lr schedule
            raise ProtocolError(f"step {msg.step} is out of order: client {member.index} last stepped at {member.last_step} and "
                                f"the run has {member.spec.steps} steps; a step must come after the last one", "FAILED_PRECONDITION")
        self._turn(member, msg)
        waiting = self.engine.waiting(member.index)
        if waiting:
            raise ProtocolError(f"step {msg.step} arrived with {len(waiting)} forward(s) still awaiting gradients", "FAILED_PRECONDITION")
        group = self.group
        behind = msg.step if group.roster.samples and not group.policy.shared_server_adapter else None
        own, lr, overflow = self.engine.run(self.engine.step, member.adapter, meta.sq_norm, meta.loss_scale, meta.overflow, behind)
        member.last_step = msg.step
        if group.turns is not None and not group.turn_ends(msg.step):
            group.turns.advance(member.index, msg.step)
        return self._reply(msg, "step", sq_norm=own, lr=lr, **({"overflow": True} if overflow else {}))

    # -- state: saving, stage 7, relays -----------------------------------------------------------------------
    def trained_for(self, session: str) -> dict[str, torch.Tensor]:
        """The server-side tensors trained for ``session`` as they are now (a tap records them at each step)."""
        member = self.sessions.get(session)
        if member is None or self.group is None:
            return {}
        return self.engine.run(self.group.on_behalf, member)

    def _state(self, member: Member, msg: Message, meta) -> Message:
        return self._reply(msg, "state", self.engine.run(self.group.on_behalf, member))

    def _global(self, member: Member, msg: Message, meta) -> Message:
        """The last average; asked for at a step (a sampled client that missed the previous round's average), the
        average that ends the previous round, once every client of that round has sent its part."""
        group = self.group
        if msg.step and group.roster.samples:
            # the last average before it: the previous round's end (after the run: its last step)
            need = group.steps if msg.step > group.steps else (msg.step - 1) // group.every * group.every
            group.meet.until(lambda: group.averaged >= need, f"the average of step {need} before step {msg.step}")
        tensors = dict(group.global_state)
        tensors.update(tag(FOLD, group.folded))
        return self._reply(msg, "state", tensors)

    def _aggregate(self, member: Member, msg: Message, meta) -> Message:
        group = self.group
        group.check_sampled(member.index, msg.kind, msg.step)
        if (meta.commit is not None) != (group.secure is not None):
            raise ProtocolError("this run aggregates " + ("securely: send masked words with a commit (secure aggregation)"
                                                          if group.secure is not None else "in the clear: send adapters, no commit"))
        if group.secure is not None:  # secure aggregation, round 3: masked words in, survivors out
            told = group.meet.meet(("aggregate", msg.step), member.index, (dict(msg.tensors), meta.weight, meta.commit),
                                   group.expected(msg.step), lambda items: group.secure.masked(msg.step, items), group.drop)
            return self._reply(msg, "state", **told)
        share = group.meet.meet(("aggregate", msg.step), member.index, (dict(msg.tensors), meta.weight),
                                group.expected(msg.step), lambda items: self.engine.run(group.aggregate, items, msg.step),
                                group.drop)
        return self._reply(msg, "state", share)

    def _checkpoint(self, member: Member, msg: Message, meta) -> Message:
        group = self.group
        group.meet.meet(("checkpoint", msg.step), member.index, None, group.active,
                        lambda items: self.engine.run(self._save, group, msg.step), group.drop)
        return self._reply(msg, "state", saved=msg.step)

    def _relay_put(self, member: Member, msg: Message, meta) -> Message:
        group = self.group
        if not group.policy.relays:
            raise ProtocolError(f"relays belong to the sequential schedule, not {group.schedule}")
        group.relay = (dict(msg.tensors), meta.optimizer.model_dump())
        if group.turns is not None and group.turns.current() == (member.index, msg.step):
            group.turns.advance(member.index, msg.step)
        return self._reply(msg, "state")

    def _relay_get(self, member: Member, msg: Message, meta) -> Message:
        group = self.group
        if group.turns is not None and msg.step:  # wait for this client's turn: the one before hands on first
            group.turns.enter(member.index, msg.step)
        if group.relay is None:
            raise ProtocolError("no client has handed on its model yet")
        tensors, optimizer = group.relay
        return self._reply(msg, "state", tensors, optimizer=optimizer)
