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

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self.header.get(key)
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            raise ValueError(f"no tensor {key!r} of a known dtype")
        begin, end = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        out = torch.empty(end - begin, dtype=torch.uint8)
        self.file.seek(self.start + begin)
        if self.file.readinto(memoryview(out.numpy())) != end - begin:
            raise ValueError(f"tensor {key!r} is cut short (the file is truncated)")
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if expected != end - begin:
            raise ValueError(f"tensor {key!r} holds {end - begin} bytes, its shape {list(shape)} needs {expected}")
        return out.view(dtype).reshape(shape)

    def close(self) -> None:
        self.file.close()
