"""What every codec shares (``codecs.py`` holds the codecs themselves): the ``Codec`` interface, its options and
header params (``Field``), the registry (``register_codec``, ``make_codec``), and the byte and scale helpers the
codecs are written with. See ``codecs.py`` for what a codec promises."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Union

import torch

from .errors import FrameError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Buffer = Union[bytes, bytearray, memoryview]
Payload = Union[Buffer, tuple[Buffer, ...]]


# -- options and header params -------------------------------------------------------------------------------
def _show(value: Any) -> str:
    return {True: "true", False: "false"}[value] if isinstance(value, bool) else repr(value)


@dataclass(frozen=True)
class Field:
    """One option of a codec (checked by ``make_codec``) or one param of its header entry (by ``decode_frame``)."""

    default: Any = None
    choices: tuple = ()  # exact values, type included (``1`` is not ``true``)
    check: Callable[[Any], bool] | None = None
    allowed: str = ""  # the allowed values in words, when not ``choices``

    def ok(self, value: Any) -> bool:
        if self.choices:
            return any(type(value) is type(c) and value == c for c in self.choices)
        return bool(self.check(value))

    def describe(self) -> str:
        return " or ".join(_show(c) for c in self.choices) if self.choices else self.allowed


def _number_in_unit_interval(v: Any) -> bool:
    return type(v) in (int, float) and 0 < v <= 1


def _non_negative_int(v: Any) -> bool:
    return type(v) is int and v >= 0


def _validate(given: Mapping, schema: Mapping[str, Field], label: Callable[[Any], str], error: type[Exception], defaults: bool) -> dict:
    for key in given:
        if key not in schema:
            raise error(f"{label(key)} is unknown; allowed: {', '.join(schema) or 'none'}")
    out = {}
    for key, field in schema.items():
        if key not in given:
            if not defaults:
                raise error(f"{label(key)} is missing; allowed values: {field.describe()}")
            out[key] = field.default
            continue
        if not field.ok(given[key]):
            raise error(f"{label(key)} = {_show(given[key])} is not allowed; allowed values: {field.describe()}")
        out[key] = given[key]
    return out


# -- bytes in and out without extra copies -------------------------------------------------------------------
def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as a memoryview of a contiguous CPU tensor: no copy for a contiguous CPU tensor (the view
    keeps it alive and aliases it, so the frame must join it before the sender writes to it again)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def _tensor_of(data: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor over payload bytes. A writable buffer is shared (no copy); a read-only one (``bytes``) is copied
    once, since torch has no read-only tensors and a receiver writing to its tensor must never write to the frame."""
    if len(data) == 0:
        return torch.empty(0, dtype=dtype)
    if data.readonly:
        data = memoryview(bytearray(data))
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


ITEMSIZE: dict[torch.dtype, int] = {d: torch.empty((), dtype=d).element_size() for d in DTYPES.values()}


def _itemsize(dtype: torch.dtype) -> int:
    return ITEMSIZE[dtype]


def _compute(x: torch.Tensor) -> torch.Tensor:
    """Quantisers compute in float32 (float64 input is narrowed first)."""
    return x if x.dtype == torch.float32 else x.float()


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """A divisor for every block: a zero scale only occurs for an all-zero block, which quantises to zeros."""
    return torch.where(scale > 0, scale, torch.ones((), dtype=scale.dtype, device=scale.device))


def _finite_scales(scale: torch.Tensor, codec: str) -> None:
    if scale.numel() and not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{codec} cannot carry NaN or Inf values (their scale is not finite); send this tensor raw")


def _check_scales(scales: torch.Tensor) -> None:
    if scales.numel():
        bad = ~torch.isfinite(scales) | (scales < 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise FrameError(f"payload.scales: scale {i} is {float(scales[i])!r}; scales must be finite and non-negative")


# -- the base class and registry -----------------------------------------------------------------------------
class Codec:
    name: ClassVar[str] = "codec"
    lossy: ClassVar[bool] = True
    options: ClassVar[dict[str, Field]] = {}  # what ``make_codec`` accepts
    params: ClassVar[dict[str, Field]] = {}  # what a frame header entry carries; a shared name is the same setting

    def __init__(self, **options: Any):
        self.opts = _validate(options, self.options, lambda k: f"{self.name}: option {k!r}", ValueError, defaults=True)

    def spec(self) -> dict[str, Any]:
        """The plain form ``make_codec`` takes back (for configs and the hello)."""
        return {"name": self.name, **self.opts}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.opts.items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(tuple(self.spec().items()))

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in FLOATING if self.lossy else dtype in DTYPE_NAMES

    def varies(self, width: int) -> str | None:
        """Why a vector of ``width`` values may decode otherwise when encoded again or beside other vectors;
        None when it always decodes the same (the activation cache needs it). A lossy codec varies until it says not."""
        return None if not self.lossy else f"the {self.name} codec is not known to decode each token alike every time"

    # -- the sender ------------------------------------------------------------------------------------------
    def encode(self, tensor: torch.Tensor, generator: torch.Generator | None = None) -> tuple[Payload, dict[str, Any]]:
        """``tensor`` may live on any device (a GPU party quantises on its GPU); the payload is CPU bytes and may
        alias ``tensor`` (raw): join or copy it before writing to ``tensor`` again. ``generator`` seeds any
        randomness (stochastic rounding); ``None`` uses torch's default generator."""
        payload, params, _ = self._encode(tensor, generator, False)
        return payload, params

    def encode_with_decoded(self, tensor: torch.Tensor, generator: torch.Generator | None = None) -> tuple[Payload, dict[str, Any], torch.Tensor]:
        """``encode`` plus the tensor the receiver will decode, bit for bit, on ``tensor``'s device and in its dtype,
        computed from the encoder's own intermediates (no bytes parsed). For a lossless codec it is ``tensor``
        itself (detached, same memory)."""
        return self._encode(tensor, generator, True)

    def _encode(self, tensor: torch.Tensor, generator: torch.Generator | None, want_decoded: bool) -> tuple[Payload, dict[str, Any], torch.Tensor | None]:
        raise NotImplementedError

    # -- the receiver ----------------------------------------------------------------------------------------
    @classmethod
    def from_header(cls, params: Any) -> "Codec":
        """The codec a header entry names, its params checked (``FrameError`` naming ``params.<field>``). Options the
        header does not carry (encode-side only: ``stochastic``, ``fraction``) take their defaults."""
        if not isinstance(params, dict):
            raise FrameError("params must be a map")
        checked = _validate(params, cls.params, lambda k: f"params.{k}", FrameError, defaults=False)
        return cls(**{k: v for k, v in checked.items() if k in cls.options})

    def encoded_size(self, dtype: torch.dtype, shape: tuple[int, ...], params: dict[str, Any]) -> int:
        """The exact payload size of ``dtype``/``shape`` under these (checked) params."""
        raise NotImplementedError

    def max_ratio(self, dtype: torch.dtype) -> float:
        """The most a legal payload of this codec (with these options) expands when decoded to ``dtype``: decoded
        bytes over payload bytes. A receiver bounds what a frame may allocate by it (a few header bytes must not
        name a huge tensor). A codec that does not say is bounded only by ``FrameLimits.max_decoded_bytes``."""
        return math.inf

    def decode(self, data: memoryview, dtype: torch.dtype, shape: tuple[int, ...], params: dict[str, Any]) -> torch.Tensor:
        """A CPU tensor of ``dtype``/``shape`` from exactly ``encoded_size`` bytes; bad content raises ``FrameError``.
        A writable ``data`` may be shared by the result (raw); a read-only one is never written to."""
        raise NotImplementedError


CodecSpec = Union[str, Mapping[str, Any], Codec]
CODECS: dict[str, type[Codec]] = {}
_DEFAULTS: dict[str, Codec] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    CODECS[cls.name] = cls
    return cls


def make_codec(spec: CodecSpec) -> Codec:
    """A codec from a name (``"int8"``), a map (``{"name": "int8", "stochastic": True}``) or a codec (returned as is).
    Unknown codecs, unknown options and out-of-range values raise ``ValueError`` naming them and what is allowed."""
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, str):
        if spec not in _DEFAULTS:
            if spec not in CODECS:
                raise ValueError(f"unknown codec {spec!r}; codecs: {', '.join(CODECS)}")
            _DEFAULTS[spec] = CODECS[spec]()
        return _DEFAULTS[spec]
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str) or name not in CODECS:
            raise ValueError(f"unknown codec {name!r}; a codec map needs 'name', one of: {', '.join(CODECS)}")
        bad = [k for k in options if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{name}: option names must be strings, got {bad[0]!r}")
        return CODECS[name](**options)
    raise ValueError(f"a codec is a name or a map with 'name', got {type(spec).__name__}")


def make_codec_with_feedback(spec: CodecSpec) -> tuple[Codec, bool]:
    """A codec spec that may also say ``error_feedback`` (the chain's setting for a lossy codec, on by default
    for ``topk``): the codec, and whether its sender carries what it dropped into the next crossing."""
    if isinstance(spec, str):
        return make_codec(spec), spec == "topk"
    options = dict(spec) if isinstance(spec, Mapping) else spec
    if not isinstance(options, dict):
        return make_codec(options), False
    feedback = options.pop("error_feedback", options.get("name") == "topk")
    if not isinstance(feedback, bool):
        raise ValueError(f"error_feedback must be true or false, got {feedback!r}")
    return make_codec(options), feedback


def get_codec(name: str) -> Codec:
    """The codec ``name`` with its default options."""
    return make_codec(name)
