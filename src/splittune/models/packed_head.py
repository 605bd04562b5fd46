"""A 4-bit LM head computed a slice of the vocabulary at a time.

bitsandbytes computes a 4-bit layer by dequantizing its whole weight for each product: for a head of 128,256 ×
4,096 that is a gigabyte in bf16, in forward and again in backward, more than packing the head saved (measured at
the Llama-3.1-8B shape: 3.28 GiB against 2.53 with an unpacked head). Here each slice of rows is dequantized, used
and dropped, in forward and again in backward (nothing but the input is saved for it), so a packed head costs its
packed bytes and one slice. The weight is the same ``Params4bit`` bitsandbytes packed; a slice's dequantized values
are exactly those of the whole weight (its blocks of 64 never straddle a slice), so the logits are transformers'
own within a product's summation order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ROWS = 8192  # vocabulary rows dequantized at a time


def _absmax(state: Any) -> torch.Tensor:
    """The float32 scale of every block of 64, undoing double quantization when the weight has it."""
    import bitsandbytes.functional as F

    if getattr(state, "nested", False) or state.state2 is not None:
        return F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


def _rows(weight: Any, absmax: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the packed weight, dequantized to its dtype."""
    import bitsandbytes.functional as F

    state, width = weight.quant_state, weight.quant_state.shape[1]
    packed = weight.data.reshape(-1)[start * width // 2: stop * width // 2].reshape(-1, 1)
    blocks = absmax[start * width // state.blocksize: stop * width // state.blocksize]
    part = F.QuantState(absmax=blocks, shape=torch.Size((stop - start, width)), dtype=state.dtype, blocksize=state.blocksize,
                        code=state.code, quant_type=state.quant_type)
    return F.dequantize_4bit(packed, part)


class _SlicedProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, head: "PackedHead") -> torch.Tensor:
        ctx.head = head
        ctx.save_for_backward(x)
        return head.product(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return ctx.head.product_back(grad, x.dtype), None


class PackedHead(nn.Module):
    """The LM head as a bitsandbytes 4-bit layer holds it, computed ``ROWS`` vocabulary rows at a time."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.weight = layer.weight  # the Params4bit: ``is_quantized`` and the stored-bytes count see it
        self.bias = layer.bias
        self.compute_dtype = layer.compute_dtype or layer.weight.quant_state.dtype
        self.out_features, self.in_features = layer.weight.quant_state.shape
        if self.in_features % layer.weight.quant_state.blocksize:
            raise ValueError(f"a packed head needs a width that is a multiple of {layer.weight.quant_state.blocksize}, "
                             f"got {self.in_features}")

    def slices(self):
        absmax = _absmax(self.weight.quant_state)
        for start in range(0, self.out_features, ROWS):
            stop = min(start + ROWS, self.out_features)
            yield start, stop, _rows(self.weight, absmax, start, stop).to(self.compute_dtype)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.compute_dtype)
        out = torch.cat([nn.functional.linear(h, w) for _, _, w in self.slices()], dim=-1)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    def product_back(self, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        g = grad.to(self.compute_dtype)
        total = None
        for start, stop, w in self.slices():
            part = g[..., start:stop] @ w
            total = part if total is None else total + part
        return total.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SlicedProduct.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self.product(x)
