"""The server party: stage 3 (trunk forward, and in the two-part split the rest of the model and the
loss), its half of stage 5 (backward to the cut), and stage 7 (the adapter average) for the clients it
serves. It learns the run from the clients' hellos; the group forms when every client has said hello.

Every incoming tensor is checked (shape, dtype, finiteness, label range) before it touches the model;
a refusal is an ``error`` message with the reason, and the server's state is left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from pathlib import Path

import torch

from .. import checkpoint
from ..data.choices import candidate_scores
from ..device import to_device
from ..models.adapters import mixed_adapters
from ..models.arch import ArchSpec
from ..models.zoo import ModelSource
from ..schedules.group import Group, Member, turn_ends
from ..schedules.meet import WaitTimeout
from ..wire import Message
from .party import Party, SessionSpec


class ProtocolError(ValueError):
    """A message the server refuses; the text goes back to the client with a gRPC status name."""

    def __init__(self, reason: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(reason)
        self.code = code


def status_of(err: Exception) -> str:
    """The gRPC status name a refusal travels with (also in-process, so clients see the same codes)."""
    if isinstance(err, ProtocolError):
        return err.code
    if isinstance(err, WaitTimeout):
        return "DEADLINE_EXCEEDED"
    return "INVALID_ARGUMENT"


STATE_OPS = ("get", "aggregate", "relay_put", "relay_get", "global", "checkpoint")


class Server:
    def __init__(self, source: ModelSource, spec: ArchSpec, config=None, wait_s: float = 600.0, state_dir: Path | None = None,
                 device: torch.device | None = None):
        self.source = source
        self.device = device if device is not None else torch.device("cpu")
        self.spec = spec
        self.config = config if config is not None else source.config()
        self.fingerprint = source.fingerprint()
        self.wait_s = wait_s
        self.state_dir = state_dir  # checkpoints of the server's part, one folder per run
        self.group: Group | None = None
        self.sessions: dict[str, Member] = {}
        self._lock = threading.Lock()
        # One model serves every client: its forward hooks and stubs are per call, so computations take
        # turns on it (waits for turns and rounds happen outside this lock).
        self._compute = threading.RLock()
        self._pending: dict[tuple, tuple] = {}

    @property
    def party(self) -> Party | None:
        return self.group.party if self.group else None

    def cancel(self, reason: str) -> None:
        """Call off every wait of the current run (turns, batches, averages) with ``reason``."""
        if self.group is not None:
            self.group.meet.cancel(reason)
            if self.group.turns is not None:
                self.group.turns.cancel(reason)

    def _locked(self, fn, *args):
        with self._compute:
            return fn(*args)

    # -- dispatch -----------------------------------------------------------------------------------
    def handle(self, msg: Message) -> Message:
        try:
            if msg.kind == "hello":
                return self._hello(msg)
            member = self.sessions.get(msg.session)
            if member is None:
                raise ProtocolError(f"unknown session {msg.session!r}; send hello first", "NOT_FOUND")
            if member.index in self.group.dropped:
                raise ProtocolError(f"client {member.index} was given up after missing a round; the run went on without it",
                                    "FAILED_PRECONDITION")
            if self.party is not None:  # tensors arrive on the CPU; the model may be elsewhere
                msg.tensors = to_device(msg.tensors, self.party.device)
            handler = {"activations": self._activations, "gradients": self._gradients, "step": self._step, "state": self._state}.get(msg.kind)
            if handler is None:
                raise ProtocolError(f"a server does not accept {msg.kind!r} messages")
            return handler(member, msg)
        except (ProtocolError, ValueError, WaitTimeout) as err:
            return Message("error", msg.session, msg.step, msg.micro, meta={"reason": str(err), "code": status_of(err)})

    def _reply(self, msg: Message, kind: str, tensors=None, **meta) -> Message:
        return Message(kind, msg.session, msg.step, msg.micro, tensors or {}, meta)

    # -- session --------------------------------------------------------------------------------------
    def _hello(self, msg: Message) -> Message:
        try:
            session = SessionSpec.from_meta(msg.meta)
        except (TypeError, ValueError) as err:
            raise ProtocolError(f"bad session proposal: {err}") from None
        if session.fingerprint != self.fingerprint:
            raise ProtocolError(
                f"model mismatch: the client's base model has fingerprint {session.fingerprint}, the server's {self.fingerprint}",
                "FAILED_PRECONDITION",
            )
        plan = session.plan(self.spec.n_blocks)
        if plan.shape == "centralized" and session.schedule != "federated":
            raise ProtocolError("a centralized run has no server part")
        resume = msg.meta.get("resume")
        if resume is not None and (not isinstance(resume, int) or resume < 1):
            raise ProtocolError(f"resume must be a completed step (a positive integer), got {resume!r}")
        with self._lock:
            if self.starts_new_run(session):
                self.group = Group(session, self.wait_s)
                self.sessions.clear()
                self._pending.clear()
            group = self.group
            group.check(session)
            member = Member(session.client, msg.session, session)
            group.members[session.client] = member
            self.sessions[msg.session] = member
        group.meet.meet("hello", member.index, resume, set(range(group.n)), lambda items: self._form(group, items))
        party = group.party
        info = {"accepted": True, "clients": group.n, "schedule": group.schedule, "checkpoints": self.state_dir is not None}
        if party is not None:
            info.update(blocks=[member.start, member.end], params=party.weights.params, bytes=party.weights.bytes,
                        trainable=party.trainable_params, fan_in_fan_out=party.fan_in_fan_out, device=str(party.device))
        return self._reply(msg, "hello", **info)

    def starts_new_run(self, session: SessionSpec) -> bool:
        """Whether this hello starts a new run (the server serves one run at a time) rather than joining one."""
        return self.group is None or session.clients == 1 or len(self.group.members) == self.group.n

    def _form(self, group: Group, items: dict) -> dict:
        group.form(self.source, self.spec, self.config, self.device)
        resumes = set(items.values())
        if len(resumes) > 1:
            raise ProtocolError(f"clients resume from different steps {sorted(map(str, resumes))}; resume them all from one checkpoint",
                                "FAILED_PRECONDITION")
        step = resumes.pop()
        if step is not None:
            self._restore(group, step)
        return {i: None for i in items}

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _run_root(self, group: Group) -> Path:
        if self.state_dir is None:
            raise ProtocolError("this server keeps no checkpoints (start it with --state DIR to resume runs)", "FAILED_PRECONDITION")
        key = hashlib.sha256(json.dumps(group.terms, sort_keys=True).encode()).hexdigest()[:16]
        return self.state_dir / f"run-{key}"

    def _save(self, group: Group, step: int) -> dict:
        groups, meta = group.party.checkpoint() if group.party is not None else ({}, {})
        groups["global"], groups["group_folded"] = dict(group.global_state), dict(group.folded)
        groups["relay"] = dict(group.relay[0]) if group.relay else {}
        meta.update(step=step, turns=group.turns.position if group.turns else None,
                    relay=group.relay[1] if group.relay else None, dropped=sorted(group.dropped))
        checkpoint.save(self._run_root(group), step, checkpoint.pack(groups), meta)
        return {i: None for i in group.members}

    def _restore(self, group: Group, step: int) -> None:
        try:
            flat, meta = checkpoint.load(self._run_root(group), step)
        except FileNotFoundError as err:
            raise ProtocolError(f"cannot resume: {err}", "FAILED_PRECONDITION") from None
        groups = checkpoint.unpack(flat)
        if group.party is not None:
            group.party.restore(groups, meta)
        device = group.party.device if group.party is not None else torch.device("cpu")  # where new averages will be
        group.global_state, group.folded = groups.get("global", {}), to_device(groups.get("group_folded", {}), device)
        if meta.get("relay") is not None:
            group.relay = (groups.get("relay", {}), meta["relay"])
        if group.turns is not None:
            group.turns.position = meta["turns"]

    # -- validation -------------------------------------------------------------------------------------
    def _hidden_in(self, msg: Message, name: str = "hidden") -> torch.Tensor:
        t = msg.tensors.get(name)
        if t is None:
            raise ProtocolError(f"{msg.kind} message lacks tensor {name!r}")
        width = self.config.get_text_config().hidden_size
        if t.dim() != 3 or t.shape[-1] != width:
            raise ProtocolError(f"tensor {name!r} has shape {tuple(t.shape)}; expected [batch, seq, {width}]")
        if t.dtype != self.party.dtype:
            raise ProtocolError(f"tensor {name!r} has dtype {t.dtype}; this session uses {self.party.dtype}")
        if not torch.isfinite(t).all():
            raise ProtocolError(f"tensor {name!r} contains NaN or Inf values (step {msg.step}, micro-batch {msg.micro})")
        return t

    def _mask(self, msg: Message, shape: torch.Size) -> torch.Tensor:
        mask = msg.tensors.get("attention_mask")
        if mask is None or tuple(mask.shape) != tuple(shape[:2]) or mask.dtype != torch.int64:
            got = None if mask is None else (tuple(mask.shape), mask.dtype)
            raise ProtocolError(f"attention_mask must be int64 of shape {tuple(shape[:2])}, got {got}")
        if not ((mask == 0) | (mask == 1)).all():
            raise ProtocolError("attention_mask may hold only 0 and 1")
        return mask

    def _labels(self, msg: Message, shape: torch.Size) -> torch.Tensor:
        labels = msg.tensors.get("labels")
        vocab = self.config.get_text_config().vocab_size
        if labels is None or tuple(labels.shape) != tuple(shape[:2]) or labels.dtype != torch.int64:
            raise ProtocolError(f"a two-part split needs int64 labels of shape {tuple(shape[:2])}")
        ok = (labels == -100) | ((labels >= 0) & (labels < vocab))
        if not ok.all():
            raise ProtocolError(f"labels must be -100 (ignored) or token ids in 0..{vocab - 1}")
        return labels

    def _needs_party(self, member: Member, msg: Message) -> Party:
        if self.party is None:
            raise ProtocolError(f"a {self.group.schedule} run has no server part; {msg.kind} messages are not served")
        return self.party

    def _adapter(self, member: Member, rows: int):
        """Run with this client's server-side adapter (several share one base under sfl-v1)."""
        if self.group.schedule == "sfl-v1" and self.group.n > 1:
            return mixed_adapters(self.party.model, [member.adapter] * rows)
        return contextlib.nullcontext()

    def _turn(self, member: Member, msg: Message) -> None:
        if self.group.turns is not None:
            self.group.turns.enter(member.index, msg.step, self._give_up_turn)

    def _give_up_turn(self, client: int) -> None:
        """A client vanished in its turn: forget its half-done step (pending forwards, gradients it left on
        the shared adapter) so the next client's step is its own."""
        self.group.drop(client, "its turn outlasted the wait")
        with self._compute:
            for key in [k for k in self._pending if k[0] == client]:
                del self._pending[key]
            trainer = self.party.trainers[self.group.members[client].adapter] if self.party else None
            if trainer is not None and trainer.optimizer is not None:
                trainer.optimizer.zero_grad(set_to_none=True)

    # -- stages 3 and 5 -------------------------------------------------------------------------------------
    def _activations(self, member: Member, msg: Message) -> Message:
        party = self._needs_party(member, msg)
        train = bool(msg.meta.get("train", True))
        if train:
            self._turn(member, msg)
        hidden = self._hidden_in(msg)
        mask = self._mask(msg, hidden.shape)
        labels = self._labels(msg, hidden.shape) if member.head else None
        if train and self.group.batched:
            item = (hidden, mask, labels, msg.meta.get("num_items"), bool(msg.meta.get("want_grad", True)))
            kind, tensors, meta = self.group.meet.meet(("forward", msg.step, msg.micro), member.index, item, self.group.active,
                                                       lambda items: self._locked(self._forward_together, msg, items), self.group.drop)
            return self._reply(msg, kind, tensors, **meta)
        if member.head:
            with self._compute:
                return self._head(member, msg, hidden, mask, labels, train)
        with self._compute, self._adapter(member, hidden.shape[0]):
            if not train:
                with torch.no_grad():
                    out = party.run(member.start, member.end, hidden=hidden, attention_mask=mask)
                return self._reply(msg, "activations", {"hidden": out.hidden})
            hidden.requires_grad_(True)
            out = party.run(member.start, member.end, hidden=hidden, attention_mask=mask)
        self._pending[(member.index, msg.step, msg.micro)] = (hidden, out.hidden)
        return self._reply(msg, "activations", {"hidden": out.hidden.detach()})

    def _head(self, member: Member, msg: Message, hidden, mask, labels, train: bool) -> Message:
        """Two-part split: the server ends the model, so it computes the loss from the client's labels."""
        party = self.party
        num_items = msg.meta.get("num_items")
        with self._adapter(member, hidden.shape[0]):
            if not train:
                with torch.no_grad():
                    out = party.run(member.start, member.end, hidden=hidden, attention_mask=mask, labels=labels,
                                    num_items_in_batch=num_items, want_logits="score_tokens" in msg.meta)
                tensors = {}
                if "score_tokens" in msg.meta:
                    tensors["scores"] = candidate_scores(out.logits, msg.meta["score_positions"], msg.meta["score_tokens"])
                return self._reply(msg, "activations", tensors, loss=float(out.loss))
            want_grad = bool(msg.meta.get("want_grad", True))
            hidden.requires_grad_(want_grad)
            out = party.run(member.start, member.end, hidden=hidden, attention_mask=mask, labels=labels, num_items_in_batch=num_items)
        out.loss.backward()
        tensors = {"grad": hidden.grad} if want_grad else {}
        return self._reply(msg, "gradients", tensors, loss=float(out.loss.detach()))

    def _forward_together(self, msg: Message, items: dict) -> dict:
        """sfl-v1: the clients' activations of one micro-batch go through the shared base as one batch,
        each row through its own client's adapter; clients entering at other blocks form their own batch."""
        party, group = self.party, self.group
        buckets: dict[tuple, list[int]] = {}
        for i, (hidden, *_rest) in items.items():
            m = group.members[i]
            buckets.setdefault((m.start, m.end, hidden.shape[1]), []).append(i)
        results = {}
        for (start, end, _), idx in buckets.items():
            hidden = torch.cat([items[i][0] for i in idx]).requires_grad_(True)
            mask = torch.cat([items[i][1] for i in idx])
            rows = [items[i][0].shape[0] for i in idx]
            names = [group.members[i].adapter for i, r in zip(idx, rows) for _ in range(r)]
            head = group.members[idx[0]].head
            with mixed_adapters(party.model, names):
                out = party.run(start, end, hidden=hidden, attention_mask=mask, want_logits=head)
            if head:
                base = party.model.get_base_model() if hasattr(party.model, "get_base_model") else party.model
                vocab = self.config.get_text_config().vocab_size
                losses = [
                    base.loss_function(logits=logits, labels=items[i][2], vocab_size=vocab, num_items_in_batch=items[i][3])
                    for i, logits in zip(idx, out.logits.split(rows))
                ]
                torch.stack(losses).sum().backward()
                for i, grad, loss in zip(idx, hidden.grad.split(rows), losses):
                    results[i] = ("gradients", {"grad": grad} if items[i][4] else {}, {"loss": float(loss.detach())})
            else:
                self._pending[("batch", msg.step, msg.micro, start, end, hidden.shape[1])] = (hidden, out.hidden, idx, rows)
                for i, h in zip(idx, out.hidden.detach().split(rows)):
                    results[i] = ("activations", {"hidden": h}, {})
        return results

    def _gradients(self, member: Member, msg: Message) -> Message:
        self._needs_party(member, msg)
        self._turn(member, msg)
        want_grad = bool(msg.meta.get("want_grad", True))
        if self.group.batched:
            batch = [v for k, v in self._pending.items() if k[:3] == ("batch", msg.step, msg.micro) and member.index in v[2]]
            if not batch:
                raise ProtocolError(f"gradients for step {msg.step} micro-batch {msg.micro}, which has no pending forward", "FAILED_PRECONDITION")
            grad = self._hidden_in(msg, "grad")
            _, hidden_out, idx, rows = batch[0]
            expected = (rows[idx.index(member.index)], *hidden_out.shape[1:])
            if tuple(grad.shape) != expected:
                raise ProtocolError(f"gradient of shape {tuple(grad.shape)} for activations of shape {expected}")
            grads = self.group.meet.meet(("backward", msg.step, msg.micro), member.index, grad, self.group.active,
                                         lambda items: self._locked(self._backward_together, msg, items), self.group.drop)
            return self._reply(msg, "gradients", {"grad": grads} if want_grad else {})
        key = (member.index, msg.step, msg.micro)
        if key not in self._pending:
            raise ProtocolError(f"gradients for step {msg.step} micro-batch {msg.micro}, which has no pending forward", "FAILED_PRECONDITION")
        hidden_in, hidden_out = self._pending[key]
        grad = self._hidden_in(msg, "grad")
        if grad.shape != hidden_out.shape:
            raise ProtocolError(f"gradient of shape {tuple(grad.shape)} for activations of shape {tuple(hidden_out.shape)}")
        del self._pending[key]
        with self._compute:
            hidden_out.backward(grad)
        return self._reply(msg, "gradients", {"grad": hidden_in.grad} if want_grad else {})

    def _backward_together(self, msg: Message, items: dict) -> dict:
        results = {}
        for key in [k for k in self._pending if k[:3] == ("batch", msg.step, msg.micro)]:
            hidden_in, hidden_out, idx, rows = self._pending.pop(key)
            # a client given up in the middle of the step contributes no gradient
            grads = [items[i] if i in items else torch.zeros((r, *hidden_out.shape[1:]), dtype=hidden_out.dtype, device=hidden_out.device)
                     for i, r in zip(idx, rows)]
            hidden_out.backward(torch.cat(grads))
            results.update((i, g) for i, g in zip(idx, hidden_in.grad.split(rows)) if i in items)
        return results

    def _step(self, member: Member, msg: Message) -> Message:
        party = self._needs_party(member, msg)
        self._turn(member, msg)
        client_sq = msg.meta.get("sq_norm")
        if not isinstance(client_sq, (int, float)) or not client_sq >= 0:
            raise ProtocolError(f"step needs a non-negative sq_norm, got {client_sq!r}")
        waiting = [k for k, v in self._pending.items() if k[0] == member.index or (k[0] == "batch" and member.index in v[2])]
        if waiting:
            raise ProtocolError(f"step {msg.step} arrived with {len(waiting)} forward(s) still awaiting gradients", "FAILED_PRECONDITION")
        with self._compute:
            own = party.sq_grad_norm(member.adapter)
            party.optimizer_step(client_sq + own, member.adapter)
        group = self.group
        if group.turns is not None and not turn_ends(group.schedule, msg.step, group.steps, group.every):
            group.turns.advance(member.index, msg.step)
        return self._reply(msg, "step", sq_norm=own, lr=party.lr_of(member.adapter))

    # -- state: saving, stage 7, relays -----------------------------------------------------------------------
    def _state(self, member: Member, msg: Message) -> Message:
        op = msg.meta.get("op", "get")
        group = self.group
        if op == "get":
            with self._compute:
                return self._reply(msg, "state", group.on_behalf(member))
        if op == "global":
            tensors = {k: v for k, v in group.global_state.items()}
            tensors.update({f"fold::{k}": v for k, v in group.folded.items()})
            return self._reply(msg, "state", tensors)
        if op == "aggregate":
            weight = msg.meta.get("weight")
            if not isinstance(weight, (int, float)) or not weight > 0:
                raise ProtocolError(f"an aggregate needs a positive weight (the client's training samples), got {weight!r}")
            share = group.meet.meet(("aggregate", msg.step), member.index, (dict(msg.tensors), float(weight)),
                                    group.active, lambda items: self._locked(group.aggregate, items), group.drop)
            return self._reply(msg, "state", share)
        if op == "checkpoint":
            group.meet.meet(("checkpoint", msg.step), member.index, None, group.active,
                            lambda items: self._locked(self._save, group, msg.step), group.drop)
            return self._reply(msg, "state", saved=msg.step)
        if op == "relay_put":
            if group.schedule != "sequential":
                raise ProtocolError(f"relays belong to the sequential schedule, not {group.schedule}")
            group.relay = (dict(msg.tensors), dict(msg.meta.get("optimizer", {})))
            if group.turns is not None and group.turns.current() == (member.index, msg.step):
                group.turns.advance(member.index, msg.step)
            return self._reply(msg, "state")
        if op == "relay_get":
            if group.relay is None:
                raise ProtocolError("no client has handed on its model yet")
            if group.turns is not None and msg.step:
                group.turns.enter(member.index, msg.step)
            tensors, optimizer = group.relay
            return self._reply(msg, "state", tensors, optimizer=optimizer)
        raise ProtocolError(f"unknown state op {op!r}; ops: {', '.join(STATE_OPS)}")
