"""Reads an offline W&B run back: its ``run-ID.wandb`` transaction log, record by record, as wandb's own protobuf
``Record`` messages (wandb ships no Python reader since its Go core took over; this is the log's documented
LevelDB-style framing: a 7-byte file header, 32 KiB blocks, each chunk a CRC-32 over its type and data, its
length and type (full, first, middle, last))."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """Every ``Record`` in one ``.wandb`` file, in order (a corrupt chunk fails its CRC)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == HEADER, f"{path} is not a W&B transaction log"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        crc, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if left < 7 or (crc, length, kind) == (0, 0, 0):  # a block's padded tail
            pos += left
            continue
        chunk = data[pos + 7: pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at {pos} in {path}"
        pos += 7 + length
        parts += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


class OfflineRun:
    """What one offline W&B run logged: its history rows, summary, config and artifacts."""

    def __init__(self, folder: Path):
        self.folder = folder
        (log,) = folder.glob("run-*.wandb")
        self.history: list[dict] = []
        self.summary: dict = {}
        self.config: dict = {}
        self.artifacts: list = []
        self.run = None
        for record in records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.run = record.run
                self.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                self.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                self.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
            elif kind == "config":
                self.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
            elif kind == "artifact":
                self.artifacts.append(record.artifact)


def offline_runs(out: Path) -> list[OfflineRun]:
    """The run directory's offline W&B runs, oldest first."""
    return [OfflineRun(f) for f in sorted((out / "wandb").glob("offline-run-*"))]
