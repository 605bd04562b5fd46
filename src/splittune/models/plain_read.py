"""One tensor of a safetensors file read with ordinary file reads, into memory of its own.

``safe_open`` maps the whole file: every page a party reads stays resident (and counted as its memory) for as long
as the file is open, which for a real checkpoint's 5 GB shards is several blocks. A party that quantizes reads its
blocks' tensors this way instead, and each full-precision copy is gone once its layer is packed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class PlainReader:
    """A safetensors file's header, and its tensors read one at a time (``ValueError`` names what is wrong)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")
        try:
            size = struct.unpack("<Q", self.file.read(8))[0]
            if size > MAX_HEADER:
                raise ValueError(f"its header claims {size} bytes")
            self.header = json.loads(self.file.read(size))
            self.start = 8 + size
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
            self.file.close()
            raise ValueError(f"not a safetensors file ({err})") from None

    def _entry(self, key: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        entry = self.header.get(key)
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            raise ValueError(f"no tensor {key!r} of a known dtype")
        begin, end = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if expected != end - begin:
            raise ValueError(f"tensor {key!r} holds {end - begin} bytes, its shape {list(shape)} needs {expected}")
        return dtype, shape, begin, end

    def _read(self, key: str, begin: int, end: int) -> torch.Tensor:
        out = torch.empty(end - begin, dtype=torch.uint8)
        self.file.seek(self.start + begin)
        if self.file.readinto(memoryview(out.numpy())) != end - begin:
            raise ValueError(f"tensor {key!r} is cut short (the file is truncated)")
        return out

    def get_tensor(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entry(key)
        return self._read(key, begin, end).view(dtype).reshape(shape)

    def lazy(self, key: str) -> "Lazy":
        """``key`` as a tensor read only a slice at a time (what ``quantize.pack_4bit`` asks of a weight)."""
        dtype, shape, begin, _ = self._entry(key)
        return Lazy(self, key, dtype, torch.Size(shape), begin)

    def close(self) -> None:
        self.file.close()


class Lazy:
    """A tensor in a file, read a flat slice at a time: ``shape``, ``dtype``, ``numel()``, ``reshape(-1)[a:b]``."""

    device = torch.device("cpu")

    def __init__(self, reader: PlainReader, key: str, dtype: torch.dtype, shape: torch.Size, begin: int):
        self.reader, self.key, self.dtype, self.shape, self.begin = reader, key, dtype, shape, begin
        self.itemsize = torch.empty((), dtype=dtype).element_size()

    def numel(self) -> int:
        return self.shape.numel()

    def detach(self) -> "Lazy":
        return self

    def reshape(self, *shape) -> "Lazy":
        if tuple(shape) not in ((-1,), ((-1,),)):
            raise ValueError("a lazily read tensor is only sliced flat")
        return self

    def __getitem__(self, part: slice) -> torch.Tensor:
        start, stop, _ = part.indices(self.numel())
        raw = self.reader._read(self.key, self.begin + start * self.itemsize, self.begin + stop * self.itemsize)
        return raw.view(self.dtype)
