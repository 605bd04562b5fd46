"""Codecs turn one tensor into bytes and back. Bytes are counted once, in the frame that carries them.

``raw`` keeps the tensor's dtype and bits exactly (bf16 stays bf16). Lossy codecs (casts,
quantisation, sparsification) register here under their own names and are picked per direction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

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


class Codec:
    name = "codec"

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
        """``tensor`` may live on any device (a GPU party sends from its GPU); ``decode`` returns CPU tensors,
        which the receiving party moves to its own device."""
        raise NotImplementedError

    def decode(self, data: memoryview, dtype: torch.dtype, shape: tuple[int, ...], params: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def encoded_size(self, dtype: torch.dtype, shape: tuple[int, ...], params: dict[str, Any]) -> int | None:
        """The exact payload size this codec produces, when it is fixed (validated on decode)."""
        return None


class RawCodec(Codec):
    """The tensor's own bytes, little-endian, C order."""

    name = "raw"

    def encode(self, tensor):
        t = tensor.detach().contiguous().cpu()
        return t.view(torch.uint8).numpy().tobytes() if t.numel() else b"", {}

    def decode(self, data, dtype, shape, params):
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        return buf.view(dtype).reshape(shape)

    def encoded_size(self, dtype, shape, params):
        return int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()


CODECS: dict[str, Codec] = {c.name: c for c in (RawCodec(),)}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; codecs: {', '.join(CODECS)}")
    return CODECS[name]
