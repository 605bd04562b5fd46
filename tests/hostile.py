"""Frames a hostile client sends (shared by the server tests): small on the wire, large once decoded."""

from __future__ import annotations

import msgpack
import torch

from splittune.wire import Message, encode_frame
from splittune.wire.frames import MAGIC


def topk_frame(kind: str, session: str, rows: int, empty: bool = False, fraction: float = 0.01, meta: dict | None = None) -> bytes:
    """A frame whose ``hidden`` [rows, 32, 64] is top-k encoded. ``empty``: its header says k=0 and names the tensor with
    no payload at all (built from one row, so any size is cheap to make)."""
    tensors = {"hidden": torch.randn(1 if empty else rows, 32, 64)}
    if not empty:
        tensors["attention_mask"] = torch.ones(rows, 32, dtype=torch.long)
    frame = encode_frame(Message(kind, session, 1, 0, tensors, {"train": True} if meta is None else meta),
                         {"hidden": {"name": "topk", "fraction": fraction}})
    if not empty:
        return frame
    hlen = int.from_bytes(frame[4:8], "little")
    header = msgpack.unpackb(frame[8:8 + hlen])
    payloads, at = {}, 8 + hlen
    for entry in header["tensors"]:
        payloads[entry["name"]], at = frame[at:at + entry["nbytes"]], at + entry["nbytes"]
    entry = next(e for e in header["tensors"] if e["name"] == "hidden")
    entry["params"]["k"], entry["nbytes"], entry["shape"][0], payloads["hidden"] = 0, 0, rows, b""
    head = msgpack.packb(header)
    return MAGIC + len(head).to_bytes(4, "little") + head + b"".join(payloads[e["name"]] for e in header["tensors"])
