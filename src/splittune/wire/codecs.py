"""Codecs turn one tensor into bytes and back. Bytes are counted once, in the frame that carries them.

A codec is a short class registered by name (the shape of peft's ``LoraVariant`` / Plato's processors) and
configured by options: ``make_codec("int8")``, ``make_codec({"name": "int4", "group": 64})``. Codecs are
stateless (error feedback and other per-session state live in the chain that picks them).

- ``encode(tensor, generator=None) -> (payload, params)``: ``payload`` is a bytes-like object or a tuple of
  them (joined in order by the frame, once); ``params`` are small plain msgpack values (flags, group size,
  k) that go in the frame header. Everything per-element or numeric (scales, indices) is in the payload.
  ``encode_with_decoded`` also returns the tensor the receiver will decode (same bits), for error feedback.
- The receiver rebuilds the codec from the header (``from_header(params)``), checks the dtype, checks the
  payload length against ``encoded_size`` (exact for every codec) and ``decode``s, refusing bad payload
  content (non-finite scales, out-of-range levels or indices) with a ``FrameError`` naming the field.

Codecs: ``raw`` (the tensor's own bytes, any dtype, bit-exact), ``fp16`` / ``bf16`` (cast on the wire,
decoded to the header dtype; finite values beyond the wire type's range are clamped to its largest finite
value, never turned into inf; NaN and inf pass unchanged), ``int8`` (per-token absmax, symmetric
[-127, 127], float32 or float16 scales, optional unbiased stochastic rounding), ``int4`` (absmax per group of
32 or 64 consecutive elements of the flattened tensor, float16 scales, levels [-7, 7], two per byte) and
``topk`` (the ``ceil(fraction * numel)`` largest magnitudes: sorted indices + values in the tensor's dtype).

Only floating tensors take lossy codecs: ``encode_frame`` refuses a lossy codec for an integer or bool
tensor (masks, labels) with a ``ValueError`` naming it, rather than silently sending it raw, so a
misconfigured codec map is caught where it is written. Lossy codecs with scales (``int8``, ``int4``) refuse
non-finite input (a NaN has no scale); send such a tensor raw and let the receiver refuse it.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar

import torch

from .codec_base import (  # noqa: F401  (re-exported: callers find every codec name here)
    CODECS, Codec, CodecSpec, DTYPES, DTYPE_NAMES, FLOATING, Field, ITEMSIZE, Payload, get_codec, make_codec,
    make_codec_with_feedback, register_codec,
)
from .codec_base import (_bytes_of, _check_scales, _compute, _finite_scales, _itemsize, _non_negative_int,
                         _number_in_unit_interval, _numel, _safe, _tensor_of)
from .errors import FrameError


# -- the codecs ----------------------------------------------------------------------------------------------
@register_codec
class Raw(Codec):
    """The tensor's own bytes, little-endian, C order: any dtype, bit-exact (bf16 stays bf16)."""

    name = "raw"
    lossy = False

    def _encode(self, tensor, generator, want_decoded):
        return _bytes_of(tensor), {}, (tensor.detach() if want_decoded else None)

    def encoded_size(self, dtype, shape, params):
        return _numel(shape) * _itemsize(dtype)

    def max_ratio(self, dtype):
        return 1.0

    def decode(self, data, dtype, shape, params):
        return _tensor_of(data, dtype).reshape(shape)


class _Cast(Codec):
    """A float cast on the wire, decoded back to the header dtype."""

    wire: ClassVar[torch.dtype]

    def varies(self, width):
        return None  # element by element

    def _encode(self, tensor, generator, want_decoded):
        x = tensor.detach()
        y = x.to(self.wire)
        if x.dtype != self.wire and x.numel():
            if not bool(torch.isfinite(y.abs().max())):  # (cheaper than isinf().any(); NaN also lands here)
                # finite values past the wire type's range become its largest finite value, not inf
                wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
                big = torch.finfo(self.wire).max
                y = torch.where(torch.isinf(y) & torch.isfinite(x), wide.clamp(-big, big).to(self.wire), y)
        return _bytes_of(y), {}, (y.to(x.dtype) if want_decoded else None)

    def encoded_size(self, dtype, shape, params):
        return _numel(shape) * _itemsize(self.wire)

    def max_ratio(self, dtype):
        return _itemsize(dtype) / _itemsize(self.wire)

    def decode(self, data, dtype, shape, params):
        return _tensor_of(data, self.wire).reshape(shape).to(dtype)


@register_codec
class Fp16(_Cast):
    """float16 on the wire; finite values beyond ±65504 are clamped to ±65504."""

    name = "fp16"
    wire = torch.float16


@register_codec
class Bf16(_Cast):
    """bfloat16 on the wire (float32's range, 8 bits of mantissa)."""

    name = "bf16"
    wire = torch.bfloat16


_SCALES = {"float32": torch.float32, "float16": torch.float16}
_F16_MAX = 65504.0


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """A token is one vector along the last dim: (rows, last); a 0-d tensor is one row of one."""
    return (math.prod(shape[:-1]), shape[-1]) if len(shape) else (1, 1)


@register_codec
class Int8(Codec):
    """Per-token absmax int8: scale = absmax / 127 per vector along the last dim, levels round(x / scale) in
    [-127, 127]. Round to nearest: |error| ≤ scale / 2. ``stochastic``: floor(x / scale + u), u ~ U[0, 1), so
    E[decode] = x and |error| < scale. float16 scales are clamped to 65504 (rows whose absmax exceeds
    127 · 65504 saturate). Payload: int8 levels (C order), then one scale per row."""

    name = "int8"
    options = {"scales": Field("float32", choices=("float32", "float16")), "stochastic": Field(False, choices=(False, True))}
    params = {"scales": Field(choices=("float32", "float16"))}

    def varies(self, width):
        return "int8 with stochastic rounding rounds every crossing anew" if self.opts["stochastic"] else None

    def _encode(self, tensor, generator, want_decoded):
        x = tensor.detach()
        rows, last = _rows(tuple(x.shape))
        sdtype = _SCALES[self.opts["scales"]]
        if x.numel() == 0:
            scale = torch.zeros(rows, dtype=torch.float32)
            codes = torch.empty(0, dtype=torch.int8)
            decoded = x.clone() if want_decoded else None
        else:
            xf = _compute(x).reshape(rows, last)
            scale = xf.abs().amax(1).div_(127)  # (abs + amax is ~10x faster than aminmax on CPU; NaN propagates)
            if sdtype is torch.float16:
                scale = scale.clamp_(max=_F16_MAX).half().float()
            _finite_scales(scale, self.name)
            y = xf / _safe(scale)[:, None]
            if self.opts["stochastic"]:
                dev = generator.device if generator is not None else y.device
                y.add_(torch.rand(y.shape, generator=generator, device=dev).to(y.device)).floor_()
            else:
                y.round_()
            codes = y.clamp_(-127, 127).to(torch.int8)
            decoded = (codes.float().mul_(scale[:, None])).to(x.dtype).reshape(x.shape) if want_decoded else None
        return (_bytes_of(codes), _bytes_of(scale.to(sdtype))), {"scales": self.opts["scales"]}, decoded

    def encoded_size(self, dtype, shape, params):
        rows, _ = _rows(shape)
        return _numel(shape) + rows * _itemsize(_SCALES[params["scales"]])

    def max_ratio(self, dtype):
        return float(_itemsize(dtype))  # a byte per value at least

    def decode(self, data, dtype, shape, params):
        n = _numel(shape)
        rows, last = _rows(shape)
        scales = _tensor_of(data[n:], _SCALES[params["scales"]]).float()
        _check_scales(scales)
        if n == 0:
            return torch.zeros(shape, dtype=dtype)
        codes = _tensor_of(data[:n], torch.int8)
        if int(codes.min()) < -127:
            raise FrameError("payload.levels: level -128 is outside [-127, 127]")
        return codes.float().reshape(rows, last).mul_(scales[:, None]).to(dtype).reshape(shape)


@register_codec
class Int4(Codec):
    """Blockwise int4: the flattened tensor in groups of ``group`` consecutive elements (the last one padded with
    zeros), a float16 absmax scale per group (absmax / 7, clamped to 65504), levels round(x / scale) in [-7, 7]:
    |error| ≤ scale / 2 (a group whose absmax is below float16's resolution, ~4e-7, decodes to zeros). Payload:
    the float16 scales, then the levels + 8 as nibbles, element 2i in the low nibble of byte i."""

    name = "int4"
    options = {"group": Field(32, choices=(32, 64))}
    params = {"group": Field(choices=(32, 64))}

    def varies(self, width):
        g = self.opts["group"]
        return None if width % g == 0 else f"int4 groups of {g} values span tokens of width {width}, so a token's scale depends on its neighbours"

    def _encode(self, tensor, generator, want_decoded):
        x = tensor.detach()
        n, g = x.numel(), self.opts["group"]
        groups = -(-n // g)
        flat = _compute(x).reshape(-1)
        if groups * g != n:
            flat = torch.nn.functional.pad(flat, (0, groups * g - n))
        blocks = flat.view(groups, g)
        absmax = blocks.abs().amax(1) if n else torch.zeros(0, device=blocks.device)
        scale16 = absmax.div_(7).clamp_(max=_F16_MAX).half()
        scale = scale16.float()
        _finite_scales(scale, self.name)
        q = (blocks / _safe(scale)[:, None]).round_().clamp_(-7, 7)
        nib = q.add(8).to(torch.uint8)
        packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
        decoded = q.mul_(scale[:, None]).reshape(-1)[:n].to(x.dtype).reshape(x.shape) if want_decoded else None
        return (_bytes_of(scale16), _bytes_of(packed)), {"group": g}, decoded

    def encoded_size(self, dtype, shape, params):
        groups = -(-_numel(shape) // params["group"])
        return groups * 2 + groups * params["group"] // 2

    def max_ratio(self, dtype):
        return 2.0 * _itemsize(dtype)  # half a byte per value at least

    def decode(self, data, dtype, shape, params):
        n, g = _numel(shape), params["group"]
        groups = -(-n // g)
        scales = _tensor_of(data[: 2 * groups], torch.float16).float()
        _check_scales(scales)
        if n == 0:
            return torch.zeros(shape, dtype=dtype)
        packed = _tensor_of(data[2 * groups :], torch.uint8).view(groups, g // 2)
        nib = torch.stack((packed & 15, packed >> 4), dim=2).view(groups, g)
        if int(nib.min()) == 0:
            raise FrameError("payload.levels: level -8 is outside [-7, 7]")
        levels = nib.to(torch.float32).sub_(8)
        return levels.mul_(scales[:, None]).reshape(-1)[:n].to(dtype).reshape(shape)


def topk_k(fraction: float, numel: int) -> int:
    """k = ceil(fraction · numel), with the fraction as written (0.1 of 10 elements is 1, not 2)."""
    return math.ceil(Fraction(repr(float(fraction))) * numel)


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


@register_codec
class TopK(Codec):
    """The k = ceil(``fraction`` · numel) largest magnitudes of the flattened tensor, exact; zeros elsewhere.
    Payload: k strictly increasing indices (int32, int64 from 2**31 elements), then the k values in the tensor's
    dtype. The header carries k."""

    name = "topk"
    options = {"fraction": Field(0.1, check=_number_in_unit_interval, allowed="a number in (0, 1]")}
    params = {"k": Field(check=_non_negative_int, allowed="a non-negative integer")}

    def varies(self, width):
        return "topk keeps the largest values of the whole tensor, so a token's values depend on the others"

    def _encode(self, tensor, generator, want_decoded):
        x = tensor.detach()
        n = x.numel()
        k = topk_k(self.opts["fraction"], n)
        flat = x.reshape(-1)
        if k == n:
            idx = torch.arange(n, device=x.device)
        else:
            idx = flat.abs().topk(k, sorted=False).indices.sort().values
        vals = flat[idx]
        decoded = None
        if want_decoded:
            decoded = torch.zeros_like(flat).index_copy_(0, idx, vals).reshape(x.shape)
        return (_bytes_of(idx.to(_index_dtype(n))), _bytes_of(vals)), {"k": k}, decoded

    def max_ratio(self, dtype):
        # k >= fraction * n values of (index + value) bytes decode to n values: below 1 / fraction
        return 1.0 / self.opts["fraction"]

    def encoded_size(self, dtype, shape, params):
        n, k = _numel(shape), params["k"]
        if k > n:
            raise FrameError(f"params.k = {k} exceeds the tensor's {n} elements")
        return k * (_itemsize(_index_dtype(n)) + _itemsize(dtype))

    def decode(self, data, dtype, shape, params):
        n, k = _numel(shape), params["k"]
        isz = _itemsize(_index_dtype(n))
        idx = _tensor_of(data[: k * isz], _index_dtype(n))
        if k:
            if int(idx[0]) < 0 or int(idx[-1]) >= n:
                bad = int(idx[0]) if int(idx[0]) < 0 else int(idx[-1])
                raise FrameError(f"payload.indices: index {bad} is outside [0, {n})")
            if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise FrameError("payload.indices: indices must be strictly increasing (none repeated, sorted)")
        vals = _tensor_of(data[k * isz :], dtype)
        return torch.zeros(n, dtype=dtype).index_copy_(0, idx.long(), vals).reshape(shape)


__all__ = [
    "CODECS", "Codec", "CodecSpec", "DTYPES", "DTYPE_NAMES", "FLOATING", "Field", "ITEMSIZE", "Payload", "make_codec",
    "make_codec_with_feedback", "get_codec", "register_codec", "topk_k", "Raw", "Fp16", "Bf16", "Int8", "Int4", "TopK",
]
