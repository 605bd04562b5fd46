"""The transforms a tensor passes through when it crosses the cut, each a short class behind one registry
(the shape of peft's ``LoraVariant`` and Plato's processors).

A transform acts on a message on its way out (``send``) and undoes what it can on the way in
(``receive``); the codec stage is last and only picks, per tensor, the codec the frame encodes with.
One instance serves one direction of one session on one end, so state (error feedback) is per session
and per direction. Both ends build their chain from the same terms, agreed in the hello, so the same
bytes cross in-process and over gRPC.

Chain data that the receiver needs (which tensors were packed) rides in ``meta["cut"]``, which the
receiving chain removes before the message reaches a party.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..wire import Message
from ..wire.codecs import Codec, make_codec_with_feedback

ROLES = ("hidden", "grad")  # the tensors of a crossing that carry activations or their gradients


class ChainError(ValueError):
    """A chain proposal the other end cannot run, or a crossing its chain cannot undo; names what is wrong."""


@dataclass
class End:
    """What one end of a session knows across both directions: which positions of each micro-batch cross
    (padding removal needs it for the replies, which do not carry the mask)."""

    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (step, micro) -> positions kept
    # (step, micro) -> the vector-Jacobian product of what a defense did to that micro-batch's activations, applied
    # to the gradient that comes back for them (the client's backward follows what was released)
    pullbacks: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)


@dataclass
class Crossing:
    """One message on its way through a sending chain: what the frame will carry and how to encode it."""

    msg: Message
    hints: dict[str, torch.Tensor] = field(default_factory=dict)  # the sender's notes to its chain (``cut.*`` tensors)
    codecs: dict[str, Codec] = field(default_factory=dict)
    cut: dict[str, Any] = field(default_factory=dict)  # chain data for the receiver (meta["cut"])
    refs: dict[str, torch.Tensor] = field(default_factory=dict)  # what lossy tensors were before error feedback


class Transform:
    name: ClassVar[str] = ""
    perturbs: ClassVar[bool] = False  # a defense's transform that changes what an evaluation sends (``Chain.undefended``)

    def __init__(self, **options: Any):
        if options:
            raise ChainError(f"transform {self.name!r} takes no options, got {sorted(options)}")

    def spec(self) -> dict[str, Any]:
        return {"name": self.name}

    def send(self, crossing: Crossing, end: End) -> None:
        """Change ``crossing`` on its way out."""

    def sent(self, crossing: Crossing, decoded: dict[str, torch.Tensor], end: End) -> None:
        """After the frame is encoded: ``decoded`` is what the receiver will decode (error feedback, statistics)."""

    def receive(self, msg: Message, cut: dict[str, Any], end: End) -> Message:
        """Undo this transform on an incoming message."""
        return msg

    def bind(self, secret: int | None, label: str) -> None:
        """On the sending end: the client's private secret (never sent) and a label for this transform's noise."""

    def varies(self, role: str, width: int) -> str | None:
        """Why a ``role`` tensor's token (``width`` values) may arrive otherwise when sent again, or beside other
        tokens; None when it always arrives the same (the activation cache needs it). A transform varies until
        it says not, so a new defense turns the cache off unless it is deterministic."""
        return f"the {self.name!r} transform is not known to deliver the same tensor every time"

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


TRANSFORMS: dict[str, type[Transform]] = {}


def register(cls: type[Transform]) -> type[Transform]:
    TRANSFORMS[cls.name] = cls
    return cls


def _activation_like(name: str, t: torch.Tensor) -> bool:
    return name in ROLES and t.dim() == 3 and t.is_floating_point()


def needed_positions(mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The positions whose values reach the loss: the real tokens, and in a left-padded row whose first
    real token carries a label, the padding before it (the logit predicting that token sits on a pad
    position; a pad row may attend to the padding before it, so all of it is kept). The sender gives this
    to its chain as the ``cut.keep`` hint; without it, the attention mask is what is kept."""
    keep = mask.bool().clone()
    labelled = torch.zeros_like(keep)
    labelled[:, :-1] = labels[:, 1:] != -100
    for row in (labelled & ~keep).any(dim=1).nonzero().flatten().tolist():
        upto = int((labelled[row] & ~keep[row]).nonzero().max())
        keep[row, : upto + 1] = True
    return keep


@register
class PaddingRemoval(Transform):
    """Positions that reach no loss are never sent: a [batch, seq, width] tensor crosses as the rows of its
    kept positions ([kept, width]) and the receiver puts zeros back. Kept are the real tokens (the
    attention mask) and, where the sender says so (``needed_positions``), the padding a loss depends on.
    Lossless: a dropped position's value reaches no real position's output nor the loss, and its
    gradient is zero."""

    name = "padding"

    def varies(self, role, width):
        return None

    @staticmethod
    def _keep(msg: Message, hint: torch.Tensor | None, end: End) -> torch.Tensor | None:
        mask = msg.tensors.get("attention_mask")
        if mask is not None:
            keep = mask.bool() if hint is None else hint.bool().to(mask.device)
            if msg.step > 0:  # a new step's masks replace older steps' (evaluations use step 0)
                for key in [k for k in end.masks if 0 < k[0] < msg.step]:
                    del end.masks[key]
            end.masks[(msg.step, msg.micro)] = keep
            return keep
        return end.masks.get((msg.step, msg.micro))

    def send(self, crossing, end):
        msg = crossing.msg
        keep = self._keep(msg, crossing.hints.get("cut.keep"), end)
        if keep is None:
            return
        mask = msg.tensors.get("attention_mask")
        if mask is not None:  # the receiver must keep what this end keeps, for the replies too
            extra = (keep & ~mask.bool().to(keep.device)).any(dim=1).nonzero().flatten().tolist()
            if extra:  # rows whose padding is kept up to a position: [row, last kept pad position]
                crossing.cut["pad_kept"] = [[r, int((keep[r] & ~mask[r].bool()).nonzero().max())] for r in extra]
        if bool(keep.all()):
            return
        rows = crossing.hints.get("cut.rows")  # the activations carry only these rows of the batch (the cache's misses)
        part = keep if rows is None else keep[rows.to(keep.device)]
        packed = []
        for name, t in list(msg.tensors.items()):
            if _activation_like(name, t) and tuple(part.shape) == tuple(t.shape[:2]):
                msg.tensors[name] = t[part.to(t.device)]
                packed.append(name)
        if packed:
            crossing.cut["packed"] = packed
            if rows is not None:
                crossing.cut["rows"] = rows.tolist()

    def receive(self, msg, cut, end):
        mask = msg.tensors.get("attention_mask")
        hint = None
        kept = cut.get("pad_kept", [])
        if kept:
            if mask is None or not isinstance(kept, list):
                raise ChainError("meta field 'cut.pad_kept' needs the message's attention mask and a list of [row, position]")
            hint = mask.bool().clone()
            for item in kept:
                if not (isinstance(item, list) and len(item) == 2 and all(isinstance(v, int) for v in item)
                        and 0 <= item[0] < mask.shape[0] and 0 <= item[1] < mask.shape[1]):
                    raise ChainError(f"meta field 'cut.pad_kept': {item!r} is not a [row, position] of a {tuple(mask.shape)} batch")
                hint[item[0], : item[1] + 1] = True
        keep = self._keep(msg, hint, end)
        packed = cut.get("packed", [])
        if not isinstance(packed, list) or not all(isinstance(n, str) for n in packed):
            raise ChainError(f"meta field 'cut.packed' must be a list of tensor names, got {packed!r}")
        if not packed:
            return msg
        if keep is None:
            raise ChainError(f"packed tensors {packed} for step {msg.step} micro-batch {msg.micro}, whose attention mask this end never saw")
        rows = cut.get("rows")
        if rows is not None:
            if not (isinstance(rows, list) and all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < keep.shape[0] for r in rows)
                    and all(a < b for a, b in zip(rows, rows[1:]))):
                raise ChainError(f"meta field 'cut.rows' must list increasing row indices of a {tuple(keep.shape)} batch, got {rows!r}")
            keep = keep[rows]
        real = int(keep.sum())
        for name in packed:
            t = msg.tensors.get(name)
            if t is None or t.dim() != 2 or not t.is_floating_point():
                raise ChainError(f"packed tensor {name!r} must be a floating [tokens, width] tensor, got {None if t is None else tuple(t.shape)}")
            if t.shape[0] != real:
                raise ChainError(f"packed tensor {name!r} has {t.shape[0]} positions, but {real} positions were kept")
            full = torch.zeros((*keep.shape, t.shape[1]), dtype=t.dtype, device=t.device)
            full[keep.to(t.device)] = t
            msg.tensors[name] = full
        return msg


@register
class CodecStage(Transform):
    """The codec of each role (``hidden``, ``grad``) in this direction; other tensors go raw.

    With ``error_feedback`` (on by default for ``topk``), what the codec dropped from a role's tensor is
    added to the next tensor of that role and micro-batch slot before encoding (Seide et al. 2014; Karimireddy
    et al. 2019), so no mass is lost for good; the residual is part of the session's checkpointed state.
    Each lossy crossing's squared error and squared norm are summed per role for the relative L2 error.
    """

    name = "codec"

    def __init__(self, **roles: Any):
        self.codecs: dict[str, Codec] = {}
        self.feedback: dict[str, bool] = {}
        for role, spec in roles.items():
            if role not in ROLES:
                raise ChainError(f"codec: unknown tensor role {role!r}; roles: {', '.join(ROLES)}")
            try:
                codec, feedback = make_codec_with_feedback(spec)
            except ValueError as err:
                raise ChainError(f"codec.{role}: {err}") from None
            if codec.lossy:
                self.codecs[role] = codec
                self.feedback[role] = feedback
        self.residual: dict[str, torch.Tensor] = {}  # f"{role}/{micro}" -> what the codec has not yet delivered
        self.error = {"sq_err": 0.0, "sq_ref": 0.0}
        self.resets = 0

    def spec(self):
        roles = {r: {**c.spec(), "error_feedback": self.feedback[r]} for r, c in self.codecs.items()}
        return {"name": self.name, **roles}

    def varies(self, role, width):
        codec = self.codecs.get(role)
        if codec is None:
            return None
        if self.feedback[role]:
            return f"{codec.name} with error feedback adds what earlier crossings dropped"
        return codec.varies(width)

    def send(self, crossing, end):
        msg = crossing.msg
        for name, t in list(msg.tensors.items()):
            codec = self.codecs.get(name)
            if codec is None or not t.is_floating_point():
                continue
            crossing.codecs[name] = codec
            if self.feedback[name] and msg.step > 0:  # evaluations (step 0) neither take nor leave residuals
                kept = self.residual.get(f"{name}/{msg.micro}")
                if kept is not None and kept.shape != t.shape:  # another shape (another batch layout): start afresh
                    kept, self.resets = None, self.resets + 1
                msg.tensors[name] = t if kept is None else t + kept
            crossing.refs[name] = t

    def sent(self, crossing, decoded, end):
        for name, ref in crossing.refs.items():
            got = decoded[name].to(ref.device, ref.dtype)
            if self.feedback[name] and crossing.msg.step > 0:
                self.residual[f"{name}/{crossing.msg.micro}"] = (crossing.msg.tensors[name] - got).detach()
            self.error["sq_err"] += float(torch.linalg.vector_norm((got - ref).double()) ** 2)
            self.error["sq_ref"] += float(torch.linalg.vector_norm(ref.double()) ** 2)

    def take_error(self) -> dict[str, float]:
        error, self.error = self.error, {"sq_err": 0.0, "sq_ref": 0.0}
        return error

    def state_dict(self):
        return {k: v.cpu() for k, v in self.residual.items()}

    def load_state_dict(self, state):
        self.residual = dict(state)


def build_transform(spec: Any) -> Transform:
    """A transform from its spec (``{"name": ..., options}``), or a ChainError naming what this end has."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ChainError(f"a chain entry is a map with a 'name', got {spec!r}")
    options = dict(spec)
    name = options.pop("name")
    if name not in TRANSFORMS:
        raise ChainError(f"unknown transform {name!r}; transforms here: {', '.join(TRANSFORMS)}")
    return TRANSFORMS[name](**options)
