"""The server party: stage 3 (trunk forward, and in the two-part split the rest of the model and the
loss) and its half of stage 5 (backward to the cut). It learns its session from the client's hello.

Every incoming tensor is checked (shape, dtype, finiteness, label range) before it touches the model;
a refusal is an ``error`` message with the reason, and the server's state is left as it was.
"""

from __future__ import annotations

import torch

from ..models.arch import ArchSpec
from ..models.zoo import ModelSource
from ..wire import Message
from .party import Party, SessionSpec


class ProtocolError(ValueError):
    """A message the server refuses; the text goes back to the client."""


class Server:
    def __init__(self, source: ModelSource, spec: ArchSpec, config=None):
        self.source = source
        self.spec = spec
        self.config = config if config is not None else source.config()
        self.fingerprint = source.fingerprint()
        self.party: Party | None = None
        self.session_id = ""
        self._pending: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- dispatch -----------------------------------------------------------------------------------
    def handle(self, msg: Message) -> Message:
        try:
            if msg.kind == "hello":
                return self._hello(msg)
            if self.party is None or msg.session != self.session_id:
                raise ProtocolError(f"unknown session {msg.session!r}; send hello first")
            handler = {"activations": self._activations, "gradients": self._gradients, "step": self._step, "state": self._state}.get(msg.kind)
            if handler is None:
                raise ProtocolError(f"a server does not accept {msg.kind!r} messages")
            return handler(msg)
        except (ProtocolError, ValueError) as err:
            return Message("error", msg.session, msg.step, msg.micro, meta={"reason": str(err)})

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
                f"model mismatch: the client's base model has fingerprint {session.fingerprint}, the server's {self.fingerprint}"
            )
        plan = session.plan(self.spec.n_blocks)
        if plan.shape == "centralized":
            raise ProtocolError("a centralized run has no server part")
        self.party = Party("server", self.source, self.spec, session, self.config)
        self.session_id = msg.session
        self._pending.clear()
        seg = self.party.segments[0]
        return self._reply(
            msg, "hello", accepted=True, blocks=[seg.start, seg.end], params=self.party.weights.params,
            bytes=self.party.weights.bytes, trainable=self.party.trainable_params, fan_in_fan_out=self.party.fan_in_fan_out,
        )

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

    # -- stages 3 and 5 -------------------------------------------------------------------------------------
    def _activations(self, msg: Message) -> Message:
        party, seg = self.party, self.party.segments[0]
        hidden = self._hidden_in(msg)
        mask = self._mask(msg, hidden.shape)
        train = bool(msg.meta.get("train", True))
        if seg.head:
            return self._head(msg, hidden, mask, train)
        if not train:
            with torch.no_grad():
                out = party.run(seg.start, seg.end, hidden=hidden, attention_mask=mask)
            return self._reply(msg, "activations", {"hidden": out.hidden})
        hidden.requires_grad_(True)
        out = party.run(seg.start, seg.end, hidden=hidden, attention_mask=mask)
        self._pending[(msg.step, msg.micro)] = (hidden, out.hidden)
        return self._reply(msg, "activations", {"hidden": out.hidden.detach()})

    def _head(self, msg: Message, hidden, mask, train: bool) -> Message:
        """Two-part split: the server ends the model, so it computes the loss from the client's labels."""
        party, seg = self.party, self.party.segments[0]
        labels = self._labels(msg, hidden.shape)
        num_items = msg.meta.get("num_items")
        if not train:
            with torch.no_grad():
                out = party.run(seg.start, seg.end, hidden=hidden, attention_mask=mask, labels=labels,
                                num_items_in_batch=num_items, want_logits="score_tokens" in msg.meta)
            tensors = {}
            if "score_tokens" in msg.meta:
                tensors["scores"] = _scores(out.logits, msg.meta["score_positions"], msg.meta["score_tokens"])
            return self._reply(msg, "activations", tensors, loss=float(out.loss))
        want_grad = bool(msg.meta.get("want_grad", True))
        hidden.requires_grad_(want_grad)
        out = party.run(seg.start, seg.end, hidden=hidden, attention_mask=mask, labels=labels, num_items_in_batch=num_items)
        out.loss.backward()
        tensors = {"grad": hidden.grad} if want_grad else {}
        return self._reply(msg, "gradients", tensors, loss=float(out.loss.detach()))

    def _gradients(self, msg: Message) -> Message:
        key = (msg.step, msg.micro)
        if key not in self._pending:
            raise ProtocolError(f"gradients for step {msg.step} micro-batch {msg.micro}, which has no pending forward")
        hidden_in, hidden_out = self._pending[key]
        grad = self._hidden_in(msg, "grad")
        if grad.shape != hidden_out.shape:
            raise ProtocolError(f"gradient of shape {tuple(grad.shape)} for activations of shape {tuple(hidden_out.shape)}")
        del self._pending[key]
        hidden_out.backward(grad)
        want_grad = bool(msg.meta.get("want_grad", True))
        return self._reply(msg, "gradients", {"grad": hidden_in.grad} if want_grad else {})

    def _step(self, msg: Message) -> Message:
        client_sq = msg.meta.get("sq_norm")
        if not isinstance(client_sq, (int, float)) or not client_sq >= 0:
            raise ProtocolError(f"step needs a non-negative sq_norm, got {client_sq!r}")
        if self._pending:
            raise ProtocolError(f"step {msg.step} arrived with {len(self._pending)} forward(s) still awaiting gradients")
        own = self.party.sq_grad_norm()
        self.party.optimizer_step(client_sq + own)
        return self._reply(msg, "step", sq_norm=own, lr=self.party.lr)

    def _state(self, msg: Message) -> Message:
        return self._reply(msg, "state", self.party.state())


def _scores(logits: torch.Tensor, positions, tokens) -> torch.Tensor:
    """Logits of candidate tokens at one position per row: label-word scoring for classification."""
    rows = torch.arange(logits.shape[0])
    pos = torch.as_tensor(positions, dtype=torch.long)
    return logits[rows, pos][:, torch.as_tensor(tokens, dtype=torch.long)].float()
