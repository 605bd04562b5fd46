"""Frozen base weights stored quantized, block by block as a party loads them (QLoRA's recipe, per segment).

bitsandbytes does the work, as transformers' ``BitsAndBytesConfig`` does: ``nf4`` and ``fp4`` are its 4-bit
``Linear4bit`` (QLoRA's NF4, optionally with double quantization of the constants), ``int8`` its LLM.int8
``Linear8bitLt`` with the outlier threshold transformers uses. Every ``nn.Linear`` and ``Conv1D`` of a block is
replaced, exactly the modules ``transformers.integrations.replace_with_bnb_linear`` replaces, from the very same
full-precision weight, so a split quantized this way computes what the unsplit model loaded by transformers with
the same config computes. Embeddings, norms and the head stay in the compute dtype (transformers never converts
the output embedding). LoRA adapters are peft's, on top of the quantized layers, in float32.

bitsandbytes is an optional dependency (``splittune[quantize]``), imported only when a segment is quantized.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..allocator import return_freed
from ..errors import SplittuneError

KINDS = ("none", "nf4", "fp4", "int8")
HEAD = -1  # the key of the LM head in a party's map of what to quantize (blocks are keyed by their index)
FOUR_BIT = ("nf4", "fp4")
INT8_THRESHOLD = 6.0  # transformers' llm_int8_threshold: activations past it take the float path (outliers)
DEVICES = ("cpu", "cuda", "xpu")  # where bitsandbytes has kernels for these layers
_INSTALL_HINT = "pip install 'splittune[quantize]'"


class QuantizeError(SplittuneError, ValueError):
    """A quantization the installed backend lacks, or one on a device or layer it cannot run on."""


@dataclass(frozen=True)
class Quantization:
    """How one segment's frozen block weights are stored (``kind``) and what its quantized layers compute in."""

    kind: str = "none"
    compute_dtype: torch.dtype = torch.float32
    double_quant: bool = False

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def transformers_config(self, head: bool = False) -> Any:
        """The ``BitsAndBytesConfig`` that loads an unsplit model quantized the same way (the exactness reference);
        ``head``: the LM head too (no module skipped)."""
        from transformers import BitsAndBytesConfig

        skip = {"llm_int8_skip_modules": []} if head else {}
        if self.kind == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, **skip)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.kind, bnb_4bit_compute_dtype=self.compute_dtype,
                                  bnb_4bit_use_double_quant=self.double_quant, **skip)


def backend() -> Any:
    """bitsandbytes, or one error line saying how to install it."""
    try:
        import bitsandbytes
        # LLM.int8 computes its matmul in float16 whatever the input, as transformers' int8 models do: not news
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)
    except ImportError:
        raise QuantizeError(f"quantize: nf4, fp4 and int8 need the bitsandbytes package, which is not installed: "
                            f"{_INSTALL_HINT} (quantize: none needs nothing)") from None
    return bitsandbytes


def check(kind: str, device: torch.device) -> None:
    """Refuse, before any weight loads, a kind nobody knows or a device bitsandbytes cannot run these layers on."""
    if kind not in KINDS:
        raise QuantizeError(f"quantize: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    if kind == "none":
        return
    if device.type not in DEVICES:
        raise QuantizeError(f"quantize: {kind} runs on {', '.join(DEVICES)} (bitsandbytes); this party computes on "
                            f"{device.type}: use quantize: none there, or train.device: cpu")
    backend()


CHUNK = 1 << 22  # weights quantized at a time (a multiple of every block size): bitsandbytes' working copies stay small


def pack_4bit(weight: torch.Tensor, q: Quantization, dtype: torch.dtype, bnb: Any) -> Any:
    """``weight`` (any float dtype, e.g. as read from the checkpoint) as bitsandbytes' 4-bit ``Params4bit``, bit for bit
    what ``Params4bit(weight.to(dtype))`` quantizes to, converting and quantizing ``CHUNK`` weights at a time: its
    blocks of 64 never straddle a chunk, so the packed bytes and scales are the same, without a full-precision copy
    of the layer and the working copies of the whole of it (about 14 bytes per weight on the CPU)."""
    flat = weight.reshape(-1)
    packed, absmax = [], []
    for start in range(0, flat.numel(), CHUNK):
        out, scale = torch.ops.bitsandbytes.quantize_4bit.default(flat[start:start + CHUNK].to(dtype), BLOCKSIZE, q.kind,
                                                                  torch.uint8)
        packed.append(out.reshape(-1))
        absmax.append(scale.reshape(-1))
    data, absmax = torch.cat(packed).reshape(-1, 1), torch.cat(absmax)
    F = bnb.functional
    code = F.get_4bit_type(q.kind, device=weight.device)
    if q.double_quant:  # as quantize_4bit's compress_statistics: the scales themselves, less their mean, in blocks of 256
        offset = absmax.mean()
        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
        state = F.QuantState(absmax=qabsmax, shape=weight.shape, dtype=dtype, blocksize=BLOCKSIZE, code=code, quant_type=q.kind,
                             offset=offset, state2=state2)
    else:
        state = F.QuantState(absmax=absmax, shape=weight.shape, dtype=dtype, blocksize=BLOCKSIZE, code=code, quant_type=q.kind)
    return bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE, compress_statistics=q.double_quant,
                             quant_type=q.kind, bnb_quantized=True)


BLOCKSIZE = 64  # bitsandbytes' and transformers' default for 4-bit weights


def _replacement(layer: nn.Module, q: Quantization, bnb: Any, dtype: torch.dtype, weight: torch.Tensor | None = None) -> nn.Module:
    """The quantized form of ``layer``, from ``weight`` (the checkpoint's tensor, any dtype) or its own loaded one."""
    weight = (layer.weight if weight is None else weight).detach()
    if isinstance(layer, Conv1D):  # [in, out]: bitsandbytes' layers hold [out, in], as transformers converts them
        weight = weight.t().contiguous()
    out_features, in_features = weight.shape
    bias = layer.bias is not None
    if q.kind == "int8":
        new = bnb.nn.Linear8bitLt(in_features, out_features, bias, has_fp16_weights=False, threshold=INT8_THRESHOLD,
                                  device="meta")
        new.weight = bnb.nn.Int8Params(weight.to(dtype).to(torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(in_features, out_features, bias, q.compute_dtype, compress_statistics=q.double_quant,
                                quant_type=q.kind, device="meta")
        new.weight = pack_4bit(weight, q, dtype, bnb)
        # bitsandbytes 0.50 repacks a 4-bit weight for a bf16 CPU kernel at the first forward in eval mode and packs it
        # back for training lossily (measured: the dequantized weight then misses by 5.2 where it missed by 0.38), and
        # that kernel computes otherwise than training does: evaluation takes the training path, exact and lossless
        new.support_avx512bf16_for_cpu = False
    if bias:
        new.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    new.source_cls = type(layer)
    return new.to(weight.device)  # int8 is quantized as it moves to a device; a 4-bit weight is packed already


def quantize_block(block: nn.Module, q: Quantization) -> None:
    """Replace every linear layer of ``block`` still at full precision by its quantized form, in place (a loading
    party packs most layers as they arrive; these are the ones a conversion made), and copy the rest (norms) out of
    the mapped checkpoint."""
    if not q.active:
        return
    backend()
    for name, module in list(block.named_modules()):
        for child_name, child in list(module.named_children()):
            if quantizable(child):
                if child.weight.device.type == "meta":
                    raise QuantizeError(f"quantize: {name}.{child_name} has no weights loaded")
                quantize_layer(module, child_name, q)
    with torch.no_grad():  # what stays unquantized (norms) is copied out of the memory-mapped checkpoint: a tensor still
        for p in block.parameters():  # viewing a shard keeps every page of it that was read resident
            if not is_quantized_tensor(p):
                p.data = p.data.clone()


def quantize_layer(parent: nn.Module, name: str, q: Quantization, weight: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> None:
    """Replace ``parent.name`` (a linear layer) by its quantized form, from ``weight`` as read from the checkpoint
    (converted to ``dtype`` a chunk at a time) or from the layer's own loaded weight."""
    layer = getattr(parent, name)
    setattr(parent, name, _replacement(layer, q, backend(), dtype or layer.weight.dtype, weight))
    return_freed()  # layer by layer: the working copies never add up


def quantizable(module: nn.Module) -> bool:
    """A layer ``quantize:`` replaces: exactly those ``transformers.integrations.replace_with_bnb_linear`` replaces."""
    return type(module) is nn.Linear or isinstance(module, Conv1D)


def is_quantized_tensor(t: torch.Tensor) -> bool:
    return type(t).__name__ in ("Params4bit", "Int8Params")


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is one of the quantized layers (its weight cannot take an added update)."""
    return is_quantized_tensor(getattr(module, "weight", None))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` takes as stored: a quantized weight's packed values and its quantization constants."""
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)
    if state is not None:
        total += _state_bytes(state)
    scb = getattr(t, "SCB", None)
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    return total


def _state_bytes(state: Any) -> int:
    total = 0
    for name in ("absmax", "code"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    return total + (_state_bytes(nested) if nested is not None else 0)
