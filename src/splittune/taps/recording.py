"""What a run records about its own privacy: observers' taps, the client's truth, and what left the client.

``train --record-tap server,aggregator,eavesdropper`` attaches a :class:`Recording` to the in-process server
(``serve --record-tap DIR`` attaches one to a deployed server): one :class:`~.tap.TapWriter` per observer in
``tap/<observer>/``, and, on the client side, ``tap/truth/`` with each training micro-batch's token ids, mask
and labels as the client holds them (the key the judge scores recoveries against; attacks cannot open it).

:class:`SentLog` is the client's own ledger of what it sent: one JSON line per message with its kind, step,
micro-batch, frame bytes and each tensor's dtype and shape (``sent.jsonl`` in every split run's directory).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from ..wire import Message
from .tap import OBSERVERS, TRUTH, TapError, TapWriter

TAP_DIR = "tap"
SENT = "sent.jsonl"


def parse_observers(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``server``, ``aggregator``, ``eavesdropper`` or several separated by commas; an unknown name is a TapError."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    bad = [n for n in names if n not in OBSERVERS]
    if bad or not names:
        raise TapError(f"--record-tap takes observers from {', '.join(OBSERVERS)} (several separated by commas), got {text!r}")
    return tuple(dict.fromkeys(names))


class Recording:
    """The taps of one run in ``folder`` (``RUN_DIR/tap``); ``truth``: also the client's own record."""

    def __init__(self, folder: Path | str, observers: tuple[str, ...], max_bytes: int, truth: bool = True,
                 meta: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.observers = observers
        self.writers = {o: TapWriter(self.folder / o, o, max_bytes, meta) for o in observers}
        self.truth_writer = TapWriter(self.folder / TRUTH, TRUTH, max_bytes, meta) if truth else None

    def attach(self, server, server_link) -> Callable[[bytes], bytes]:
        """Tap ``server_link`` for the server and aggregator; return its ``serve`` as the eavesdropper hears it."""
        for observer in ("server", "aggregator"):
            writer = self.writers.get(observer)
            if writer is not None:
                if observer == "server":
                    writer.state_of = server.trained_for
                server_link.add_tap(writer)
        serve = server_link.serve
        eavesdropper = self.writers.get("eavesdropper")
        if eavesdropper is None:
            return serve

        def overheard(frame: bytes) -> bytes:
            eavesdropper.record_frame("up", "", frame)
            reply = serve(frame)
            eavesdropper.record_frame("down", "", reply)
            return reply

        return overheard

    def truth(self, session: str, step: int, micro: int, batch: dict[str, torch.Tensor]) -> None:
        """A training micro-batch as the client holds it (called as it is sent)."""
        if self.truth_writer is not None:
            keep = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
            self.truth_writer.add("up", "batch", session, step, micro, keep, {}, 0)

    def close(self) -> None:
        for writer in (*self.writers.values(), self.truth_writer):
            if writer is not None:
                writer.close()


class SentLog:
    """``sent.jsonl``: every message this client sent during the run, as a line of metadata (never a tensor's content).
    Once the run closes it, messages sent on (a test driving the parties afterwards) are not the run's."""

    def __init__(self, path: Path, append: bool = False):
        self._file = open(path, "a" if append else "w")
        self._lock = threading.Lock()

    def __call__(self, msg: Message, nbytes: int) -> None:
        meta = {k: v for k, v in msg.meta.items() if k not in ("cache", "chain")}
        if "cache" in msg.meta:
            meta["cache_rows_sent"] = len(msg.meta["cache"].get("sent", []))
        row = {"kind": msg.kind, "session": msg.session, "step": msg.step, "micro": msg.micro, "frame_bytes": nbytes,
               "tensors": {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                           for k, t in msg.tensors.items() if not k.startswith("cut.")},
               "meta": json.loads(json.dumps(meta, default=str)) if msg.kind != "hello" else {"session_proposal": True}}
        with self._lock:
            if not self._file.closed:
                self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()
