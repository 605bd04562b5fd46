"""What the server accepts: a typed ``meta`` schema per message kind and the checks on incoming tensors.

Everything a client sends is validated here before it reaches the model, so a wrong type or value is
refused as ``INVALID_ARGUMENT`` naming the field (never a ``TypeError`` from deep inside a forward).
Schemas are strict: ``"3"`` is not an integer, ``1`` is not a boolean, unknown fields are refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..models.stages import StageError
from .cache import KEY


def bounded(text: str, limit: int = 1000) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out: a reply or a log line quoting what a client
    sent (an id, a proposal) stays small however large that was."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


class WaitTimeout(RuntimeError):
    """A round waited too long for clients that did not come (or the run was called off): DEADLINE_EXCEEDED."""


class ProtocolError(ValueError):
    """A message the server refuses; the text goes back to the client with a gRPC status name."""

    def __init__(self, reason: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(reason)
        self.code = code


class Meta(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CacheMeta(Meta):
    """The activation cache's part of a training micro-batch (``parties/cache.py``)."""

    keys: list[str] = Field(min_length=1, max_length=1 << 16, description="one key per row of the micro-batch")
    sent: list[int] = Field(description="the rows whose activations this message carries, increasing")
    reset: bool = Field(False, description="the client starts its cache afresh: forget this session's first")

    @field_validator("keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        bad = next((k for k in keys if not KEY.fullmatch(k)), None)
        if bad is not None:
            raise ValueError(f"a key is 32 lowercase hex digits, got {bad[:40]!r}")
        return keys

    @model_validator(mode="after")
    def _rows(self) -> "CacheMeta":
        rows = len(self.keys)
        if any(not 0 <= i < rows for i in self.sent) or any(a >= b for a, b in zip(self.sent, self.sent[1:])):
            raise ValueError(f"sent must list increasing row indices in 0..{rows - 1}, got {self.sent[:16]}")
        return self


class ActivationsMeta(Meta):
    train: bool = True
    num_items: int | None = Field(None, ge=1, description="loss-carrying tokens of the whole step (two-part)")
    want_grad: bool = True
    score_positions: list[int] | None = None
    score_tokens: list[int] | None = None
    cache: CacheMeta | None = None
    loss_scale: float | None = Field(None, description="two-part, float16: the scale the server multiplies the loss by")

    _loss_scale = field_validator("loss_scale", mode="before")(classmethod(lambda cls, v: _scale(v)))

    @model_validator(mode="after")
    def _scores_together(self) -> "ActivationsMeta":
        if (self.score_positions is None) != (self.score_tokens is None):
            raise ValueError("score_positions and score_tokens come together")
        if self.score_positions is not None and self.train:
            raise ValueError("candidate scores are an evaluation request (train: false)")
        if self.cache is not None and not self.train:
            raise ValueError("the activation cache serves training forwards only (train: true)")
        return self


class GradientsMeta(Meta):
    want_grad: bool = True


def _scale(v: Any) -> float | None:
    """A float16 loss scale: a finite number > 0 (None: the run scales nothing)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
        raise ValueError(f"must be a finite number > 0, got {v!r}")
    return float(v)


class StepMeta(Meta):
    sq_norm: float = Field(ge=0.0)
    loss_scale: float | None = Field(None, description="float16: the scale every gradient of this step carries")
    overflow: bool = Field(False, description="float16: a gradient of the client's overflowed (the step is skipped)")

    _loss_scale = field_validator("loss_scale", mode="before")(classmethod(lambda cls, v: _scale(v)))

    @field_validator("sq_norm", mode="before")
    @classmethod
    def _number(cls, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be a number, got {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v!r}")
        return float(v)


class AggregateMeta(Meta):
    weight: float = Field(gt=0.0, description="the client's training samples")
    commit: str | None = Field(None, pattern="^[0-9a-f]{64}$", description="secure aggregation: the client's commitment "
                               "to its self-mask (its tensors are then masked ring words)")

    @field_validator("weight", mode="before")
    @classmethod
    def _number(cls, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v!r}")
        return float(v)


class OptimizerMeta(Meta):
    scheduler: dict[str, Any] | None = None
    steps: dict[str, float] = Field(default_factory=dict)
    loss_scale: dict[str, Any] | None = None  # the client's float16 loss scale travels with its optimizer


class RelayPutMeta(Meta):
    optimizer: OptimizerMeta


class Empty(Meta):
    pass


class GenerateMeta(Meta):
    """One forward of split generation (``parties/server/inference.py``): the new positions of every row."""

    start: int = Field(ge=0, description="positions this session's KV cache already holds (0: a new sequence)")
    keep: int | None = Field(None, ge=0, description="two-part: logits of only the last ``keep`` positions (0: all)")


# What an inference session serves, with its meta schema (it opens with a hello whose meta has ``inference``).
INFERENCE_SCHEMAS: dict[str, type[Meta]] = {"generate": GenerateMeta, "close": Empty}


# Every kind the server serves after the hello, with its meta schema (the hello is the session proposal).
SCHEMAS: dict[str, type[Meta]] = {
    "activations": ActivationsMeta,
    "gradients": GradientsMeta,
    "step": StepMeta,
    "state": Empty,  # what the server trained for this client
    "global": Empty,  # the last average and the folded updates
    "aggregate": AggregateMeta,
    "checkpoint": Empty,
    "relay_put": RelayPutMeta,
    "relay_get": Empty,
    "secagg_keys": Empty,  # secure aggregation (parties/secure.py): a client's public keys for one average
    "secagg_shares": Empty,
    "secagg_unmask": Empty,
}


def parse_meta(kind: str, meta: dict[str, Any], schemas: dict[str, type[Meta]] = SCHEMAS) -> Meta:
    """``meta`` of a ``kind`` message as its typed schema, or a ProtocolError naming the field."""
    schema = schemas.get(kind)
    if schema is None:
        what = "an inference session" if schemas is INFERENCE_SCHEMAS else "a training session"
        raise ProtocolError(f"{what} does not serve {kind!r} messages; it serves {', '.join(['hello', *schemas])}")
    try:
        return schema.model_validate(meta)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "meta"
        if first["type"] == "extra_forbidden":
            allowed = ", ".join(schema.model_fields) or "none"
            raise ProtocolError(f"{kind} message: unknown meta field {field!r} (fields: {allowed})") from None
        got = f" (got {first['input']!r})" if "input" in first and first["type"] != "missing" else ""
        raise ProtocolError(f"{kind} message: meta field {field!r}: {first['msg'].removeprefix('Value error, ')}{got}") from None


# -- incoming tensors -----------------------------------------------------------------------------------
def hidden_in(tensors: dict[str, torch.Tensor], kind: str, name: str, width: int, dtype: torch.dtype, where: str) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise ProtocolError(f"{kind} message lacks tensor {name!r}")
    if t.dim() != 3 or t.shape[-1] != width:
        raise ProtocolError(f"tensor {name!r} has shape {tuple(t.shape)}; expected [batch, seq, {width}]")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ProtocolError(f"tensor {name!r} has shape {tuple(t.shape)}: an empty batch or a zero-length sequence "
                            "(a micro-batch needs at least one row of at least one token)")
    if t.dtype != dtype:
        raise ProtocolError(f"tensor {name!r} has dtype {t.dtype}; this session uses {dtype}")
    if not torch.isfinite(t).all():
        raise ProtocolError(f"tensor {name!r} contains NaN or Inf values ({where})")
    return t


def cached_in(tensors: dict[str, torch.Tensor], cache: CacheMeta, width: int, dtype: torch.dtype, where: str) -> tuple[torch.Tensor | None, int]:
    """The rows a cached micro-batch carries (None: none) and its sequence length, checked against its meta."""
    mask = tensors.get("attention_mask")
    rows = len(cache.keys)
    if mask is None or mask.dim() != 2 or mask.shape[0] != rows:
        got = None if mask is None else tuple(mask.shape)
        raise ProtocolError(f"meta field 'cache.keys' has {rows} keys, but the attention mask has shape {got}")
    if not cache.sent:
        if "hidden" in tensors:
            raise ProtocolError("tensor 'hidden' came with a micro-batch whose rows meta field 'cache.sent' says are all cached")
        return None, mask.shape[1]
    hidden = hidden_in(tensors, "activations", "hidden", width, dtype, where)
    if tuple(hidden.shape[:2]) != (len(cache.sent), mask.shape[1]):
        raise ProtocolError(f"tensor 'hidden' has shape {tuple(hidden.shape)}; meta field 'cache.sent' lists {len(cache.sent)} rows "
                            f"of length {mask.shape[1]}")
    return hidden, mask.shape[1]


def router_in(tensors: dict[str, torch.Tensor], kind: str, rows: int, experts: int, where: str) -> torch.Tensor:
    """Router sums (or their gradient) of a mixture-of-experts stage: float32 [rows, 2·experts + 1], finite."""
    t = tensors.get("router")
    expected = (rows, 2 * experts + 1)
    if t is None:
        raise ProtocolError(f"{kind} message lacks tensor 'router' (this model's router loss needs it)")
    if tuple(t.shape) != expected or t.dtype != torch.float32:
        raise ProtocolError(f"tensor 'router' must be float32 of shape {list(expected)}, got {t.dtype} {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ProtocolError(f"tensor 'router' contains NaN or Inf values ({where})")
    return t


def mask_in(tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    mask = tensors.get("attention_mask")
    if mask is None or tuple(mask.shape) != tuple(shape[:2]) or mask.dtype != torch.int64:
        got = None if mask is None else (tuple(mask.shape), mask.dtype)
        raise ProtocolError(f"attention_mask must be int64 of shape {tuple(shape[:2])}, got {got}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ProtocolError("attention_mask may hold only 0 and 1")
    return mask


def labels_in(tensors: dict[str, torch.Tensor], shape: torch.Size, vocab: int) -> torch.Tensor:
    labels = tensors.get("labels")
    if labels is None or tuple(labels.shape) != tuple(shape[:2]) or labels.dtype != torch.int64:
        raise ProtocolError(f"a two-part split needs int64 labels of shape {tuple(shape[:2])}")
    ok = (labels == -100) | ((labels >= 0) & (labels < vocab))
    if not ok.all():
        raise ProtocolError(f"labels must be -100 (ignored) or token ids in 0..{vocab - 1}")
    return labels


def scores_in(meta: ActivationsMeta, shape: torch.Size, vocab: int) -> tuple[list[int], list[int]] | None:
    """Candidate-score positions (one per row, within the sequence) and tokens (within the vocabulary)."""
    if meta.score_positions is None:
        return None
    positions, tokens = meta.score_positions, meta.score_tokens
    if len(positions) != shape[0]:
        raise ProtocolError(f"meta field 'score_positions' has {len(positions)} entries for a batch of {shape[0]}")
    if any(not 0 <= p < shape[1] for p in positions):
        raise ProtocolError(f"meta field 'score_positions' must lie in 0..{shape[1] - 1}, got {positions}")
    if not tokens or any(not 0 <= t < vocab for t in tokens):
        raise ProtocolError(f"meta field 'score_tokens' must be token ids in 0..{vocab - 1}, got {tokens}")
    return positions, tokens


def status_of(err: Exception) -> str:
    """The gRPC status name a refusal travels with (also in-process, so clients see the same codes)."""
    if isinstance(err, ProtocolError):
        return err.code
    if isinstance(err, WaitTimeout):
        return "DEADLINE_EXCEEDED"
    if isinstance(err, StageError):
        return "INTERNAL"
    return "INVALID_ARGUMENT"
