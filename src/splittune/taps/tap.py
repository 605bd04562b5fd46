"""Taps on disk: exactly what one observer saw, as safetensors shards plus a JSON index (never pickle).

A :class:`TapWriter` is a channel tap (``(direction, message, frame bytes)``, DESIGN.md "taps sit where an
observer stands") that keeps what its observer keeps:

- ``server``: every tensor message as the server's receiving chain hands it over (activations at each cut,
  the gradients it receives, attention masks, labels in the two-part split), what the server itself sent
  back (``direction: down``, its own knowledge), the hello it accepted (model, cuts, chain terms), and its
  own adapter state at each step (recorded when the step message arrives, i.e. the state the step used);
- ``aggregator``: each client's adapters as they arrive for an average, and the share sent back;
- ``eavesdropper``: the frames as bytes (``record_frame``), before any chain.

The judge's key, what the client really sent (``truth``), is written in the same format by the client side
into a sibling folder; :class:`Tap` refuses to open it, so an attack cannot be handed it.

Size is bounded by ``max_bytes``: once tensors would pass it, records keep their index rows but no tensors,
and the index says how many were dropped.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import SplittuneError
from ..wire import Message

OBSERVERS = ("server", "aggregator", "eavesdropper")
TRUTH = "truth"  # the client's own record: the judge's key, never an attack's input
INDEX = "tap.json"
FORMAT = 1
SHARD_BYTES = 64 << 20  # tensors buffered before a shard is written

SERVER_KINDS = ("activations", "gradients", "generate")  # generate: split generation, the prompt and every token
AGGREGATOR_KINDS = ("aggregate",)
TRUTH_KINDS = ("batch",)


class TapError(SplittuneError, ValueError):
    """A tap that cannot be read or written as asked; the text names the folder and what is wrong."""


def _meta_value(value: Any) -> Any:
    """``value`` as plain JSON (meta is msgpack-plain already; tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


class TapWriter:
    """Records one observer's view into ``folder``; call it as a channel tap, and ``close()`` at the end."""

    def __init__(self, folder: Path | str, observer: str, max_bytes: int = 1 << 30, meta: dict[str, Any] | None = None):
        if observer not in (*OBSERVERS, TRUTH):
            raise TapError(f"unknown observer {observer!r}; observers: {', '.join(OBSERVERS)}")
        self.folder = Path(folder)
        self.observer = observer
        self.max_bytes = int(max_bytes)
        self.meta = dict(meta or {})
        self.records: list[dict[str, Any]] = []
        self.sessions: dict[str, dict[str, Any]] = {}
        self.stored = 0  # tensor bytes kept
        self.dropped = 0  # records whose tensors did not fit
        self.state_of: Callable[[str], dict[str, torch.Tensor]] | None = None  # the server's adapters per session
        self._asked: dict[str, str] = {}  # each session's last request kind: what a "state" reply answers
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._shards = 0
        self._lock = threading.Lock()
        self.folder.mkdir(parents=True, exist_ok=True)
        if (self.folder / INDEX).exists():
            raise TapError(f"{self.folder} already holds a tap; record into an empty folder")

    # -- what each observer keeps ------------------------------------------------------------------------
    def __call__(self, direction: str, msg: Message, nbytes: int) -> None:
        if msg.kind == "hello":
            self._hello(direction, msg)
            return
        if self.observer == "server" and msg.kind == "step" and direction == "up" and self.state_of is not None:
            self.add(direction, "adapters", msg.session, msg.step, msg.micro, self.state_of(msg.session), {}, 0)
        kind = msg.kind
        if direction == "up":
            self._asked[msg.session] = kind
        elif kind == "state" and self._asked.get(msg.session) == "aggregate":
            kind = "aggregate"  # the share an average sends back
        kinds = SERVER_KINDS if self.observer == "server" else AGGREGATOR_KINDS if self.observer == "aggregator" else ()
        if kind in kinds and msg.tensors:
            meta = {k: v for k, v in msg.meta.items() if k not in ("link", "cut")}
            self.add(direction, kind, msg.session, msg.step, msg.micro, msg.tensors, meta, nbytes)

    def _hello(self, direction: str, msg: Message) -> None:
        with self._lock:
            entry = self.sessions.setdefault(msg.session, {})
            if direction == "up":
                entry["proposal"] = _meta_value({k: v for k, v in msg.meta.items() if k != "chain"})
            elif "chain" in msg.meta:
                entry["chain"] = _meta_value(msg.meta["chain"])

    def record_frame(self, direction: str, session: str, frame: bytes) -> None:
        """An eavesdropper's view: the frame's bytes as they cross."""
        data = torch.frombuffer(bytearray(frame), dtype=torch.uint8) if frame else torch.zeros(0, dtype=torch.uint8)
        self.add(direction, "frame", session, 0, 0, {"frame": data}, {}, len(frame))

    # -- storage -----------------------------------------------------------------------------------------
    def add(self, direction: str, kind: str, session: str, step: int, micro: int, tensors: dict[str, torch.Tensor],
            meta: dict[str, Any], nbytes: int) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            index = len(self.records)
            row = {"id": index, "direction": direction, "kind": kind, "session": session, "step": int(step),
                   "micro": int(micro), "frame_bytes": int(nbytes), "meta": _meta_value(meta), "tensors": {}}
            if self.stored + size > self.max_bytes:
                row["dropped"] = True
                self.dropped += 1
            else:
                for name, t in tensors.items():
                    key = f"{index}/{name}"
                    self._shard[key] = t.clone()  # a received tensor may share a frame's buffer
                    row["tensors"][name] = {"key": key, "shard": self._shards, "dtype": str(t.dtype).removeprefix("torch."),
                                            "shape": list(t.shape)}
                self.stored += size
                self._shard_bytes += size
            self.records.append(row)
            if self._shard_bytes >= SHARD_BYTES:
                self._flush()

    def _flush(self) -> None:
        if self._shard:
            save_file(self._shard, str(self.folder / f"shard-{self._shards:05d}.safetensors"))
            self._shards += 1
        self._shard, self._shard_bytes = {}, 0
        self._write_index()

    def _write_index(self) -> None:
        index = {"format": FORMAT, "observer": self.observer, "meta": _meta_value(self.meta), "sessions": self.sessions,
                 "records": self.records, "stored_bytes": self.stored, "max_bytes": self.max_bytes, "dropped": self.dropped}
        tmp = self.folder / f"{INDEX}.tmp"
        tmp.write_text(json.dumps(index))
        tmp.replace(self.folder / INDEX)

    def close(self) -> None:
        with self._lock:
            self._flush()


@dataclass
class Record:
    """One message an observer saw; ``tensors()`` reads its tensors from the shards."""

    tap: "Recorded"
    id: int
    direction: str
    kind: str
    session: str
    step: int
    micro: int
    frame_bytes: int
    meta: dict[str, Any]
    entries: dict[str, dict[str, Any]] = field(repr=False)
    dropped: bool = False

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.tap._read(entry) for name, entry in self.entries.items()}

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise TapError(f"record {self.id} ({self.kind}, step {self.step}) holds no tensor {name!r}; "
                           f"it holds {', '.join(self.entries) or 'none'}")
        return self.tap._read(self.entries[name])


class Recorded:
    """A tap folder read back: its index and its tensors (shared by :class:`Tap` and :class:`Truth`)."""

    def __init__(self, folder: Path, index: dict[str, Any]):
        self.folder = folder
        self.observer: str = index["observer"]
        self.meta: dict[str, Any] = index.get("meta", {})
        self.sessions: dict[str, dict[str, Any]] = index.get("sessions", {})
        self.dropped = int(index.get("dropped", 0))
        self._rows = index["records"]
        self._files: dict[int, Any] = {}

    def records(self, kind: str | None = None, direction: str | None = None, session: str | None = None) -> Iterator[Record]:
        for row in self._rows:
            if (kind is None or row["kind"] == kind) and (direction is None or row["direction"] == direction) \
                    and (session is None or row["session"] == session):
                yield Record(self, row["id"], row["direction"], row["kind"], row["session"], row["step"], row["micro"],
                             row["frame_bytes"], row["meta"], row["tensors"], bool(row.get("dropped")))

    def _read(self, entry: dict[str, Any]) -> torch.Tensor:
        shard = int(entry["shard"])
        handle = self._files.get(shard)
        if handle is None:
            path = self.folder / f"shard-{shard:05d}.safetensors"
            if not path.exists():
                raise TapError(f"tap shard {path.name} is missing from {self.folder}")
            handle = self._files[shard] = safe_open(str(path), framework="pt")
        return handle.get_tensor(entry["key"])


class Tap(Recorded):
    """A recorded tap, read-only: what one observer saw and nothing else (DESIGN.md contract 6)."""

    @classmethod
    def open(cls, folder: Path | str, observer: str | None = None) -> "Tap":
        folder = Path(folder)
        index = read_index(folder)
        if index.get("observer") == TRUTH:
            raise TapError(f"{folder} is the client's own record of what it sent (the judge's key), not an observer's tap")
        if observer is not None and index.get("observer") != observer:
            raise TapError(f"{folder} is the {index.get('observer')}'s tap; this needs the {observer}'s")
        return cls(folder, index)

    def proposal(self, session: str | None = None) -> dict[str, Any]:
        """The session proposal the server accepted (model, cuts, segments, LoRA …); the first session's by default."""
        sessions = self.sessions if session is None else {session: self.sessions.get(session, {})}
        for entry in sessions.values():
            if "proposal" in entry:
                return entry["proposal"]
        raise TapError(f"the tap in {self.folder} holds no session proposal (was the hello recorded?)")

    def chain(self, session: str | None = None) -> dict[str, list]:
        """The chain terms the session agreed (codecs, padding removal, defenses): the server knows them."""
        sessions = self.sessions if session is None else {session: self.sessions.get(session, {})}
        for entry in sessions.values():
            if "chain" in entry:
                return entry["chain"]
        return {"up": [], "down": []}


class Truth(Recorded):
    """The client's own record of each training micro-batch it sent: the judge's key, never an attack's input."""

    @classmethod
    def open(cls, folder: Path | str) -> "Truth":
        folder = Path(folder)
        index = read_index(folder)
        if index.get("observer") != TRUTH:
            raise TapError(f"{folder} is the {index.get('observer')}'s tap, not the client's record of what it sent")
        truth = cls(folder, index)
        truth._by_key = {(r.session, r.step, r.micro): r for r in truth.records("batch")}
        return truth

    def batch(self, session: str, step: int, micro: int) -> dict[str, torch.Tensor] | None:
        record = self._by_key.get((session, step, micro))
        return record.tensors() if record is not None and not record.dropped else None


def read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX
    if not path.exists():
        raise TapError(f"{folder} holds no tap ({INDEX} is missing)")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TapError(f"{path} is not a readable tap index: {err}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or "records" not in index:
        raise TapError(f"{path} is not a splittune tap index (format {FORMAT})")
    return index
