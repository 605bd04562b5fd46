"""The activation cache: with a frozen, deterministic bottom, a training sample's activations are the same
every epoch, so they cross the cut once and the server reuses what arrived (docs/efficiency.md).

Each end of a session holds one :class:`ActivationCache`: the server's keeps the rows that arrived, the
client's mirrors it without tensors. Both apply the same operations in the same order (``take``: the
rows not sent are hits, then the rows sent are stored, the least recently used evicted beyond the
budget), so the client knows which rows it may skip. Correctness never rests on the mirror: a server
lacking a row refuses the micro-batch (``CACHE_MISS``), and the client resends it whole with ``reset``,
both ends starting afresh.

A row's key is a keyed hash (HMAC-SHA256 under a secret only the client holds) of the base model's
fingerprint, the bottom cut, the sample id and the row's tokens, mask and labels: it names one input at
one cut without telling the server anything about it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from typing import Any

import torch

CACHE_MISS = "ABORTED"  # the status of a micro-batch whose cached rows the server lacks: resend it whole
KEY = re.compile(r"[0-9a-f]{32}")
COUNTS = ("hits", "misses", "evictions")
MIRROR_COUNTS = (*COUNTS, "resent", "bottom_forwards_skipped", "bytes_saved_up")  # what a client reports


def entry_bytes(seq: int, width: int, dtype: torch.dtype) -> int:
    """What one cached row costs the server (and what the client's mirror counts for it)."""
    return seq * width * torch.empty((), dtype=dtype).element_size()


def row_keys(secret: bytes, fingerprint: str, cut: int, batch: dict[str, torch.Tensor]) -> list[str]:
    """One key per row of ``batch`` (which carries ``sample_id``)."""
    rows = [batch[k].cpu() for k in ("input_ids", "attention_mask", "labels")]
    head = f"{fingerprint}|{cut}".encode()
    keys = []
    for r, sample in enumerate(batch["sample_id"].tolist()):
        h = hmac.new(secret, head, hashlib.sha256)
        h.update(int(sample).to_bytes(8, "little", signed=True))
        for t in rows:
            h.update(t[r].contiguous().numpy().tobytes())
        keys.append(h.hexdigest()[:32])
    return keys


class ActivationCache:
    """Rows by key, least recently used first, within ``max_bytes`` (the mirror stores sizes, no tensors)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[int, torch.Tensor | None]] = OrderedDict()
        self.bytes = 0
        self.counts = dict.fromkeys(COUNTS, 0)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def row(self, key: str) -> torch.Tensor | None:
        return self.entries[key][1]

    def missing(self, keys: list[str]) -> list[int]:
        """The rows this end does not hold: the ones a client sends."""
        return [i for i, k in enumerate(keys) if k not in self.entries]

    def take(self, keys: list[str], sent: list[int], nbytes: int, rows: list[torch.Tensor] | None = None) -> None:
        """One micro-batch, the same on both ends: the rows not ``sent`` become the most recent, then the rows
        sent are stored in order (``rows``: their tensors, on the server), evicting beyond the budget."""
        carried = set(sent)
        for i, key in enumerate(keys):
            if i not in carried:
                self.entries.move_to_end(key)
                self.counts["hits"] += 1
        for j, i in enumerate(sent):
            self._put(keys[i], nbytes, None if rows is None else rows[j])
            self.counts["misses"] += 1

    def _put(self, key: str, nbytes: int, row: torch.Tensor | None) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old[0]
        if nbytes > self.max_bytes:
            return  # a row larger than the whole budget is never kept
        self.entries[key] = (nbytes, row)
        self.bytes += nbytes
        self._fit()

    def _fit(self) -> None:
        while self.bytes > self.max_bytes:
            _, (n, _) = self.entries.popitem(last=False)
            self.bytes -= n
            self.counts["evictions"] += 1

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    # -- checkpoints: the order as plain data, the rows as tensors -------------------------------------------
    def order(self) -> list[list[Any]]:
        return [[k, n] for k, (n, _) in self.entries.items()]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: row for k, (_, row) in self.entries.items() if row is not None}

    def load(self, order: list[list[Any]], tensors: dict[str, torch.Tensor] | None = None, device=None) -> None:
        """Entries in ``order`` (least recently used first); a smaller budget than the saved one evicts the oldest."""
        self.clear()
        for key, nbytes in order:
            row = None if tensors is None else tensors[key].to(device or "cpu")
            self.entries[key] = (int(nbytes), row)
            self.bytes += int(nbytes)
        self._fit()


class Mirror(ActivationCache):
    """The client's copy of the server's cache: which rows it may skip, its secret, and what the cache saved."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes)
        self.secret = secrets.token_bytes(16)
        self.counts = dict.fromkeys(MIRROR_COUNTS, 0)

    def state(self) -> dict[str, Any]:
        return {"secret": self.secret.hex(), "order": self.order(), "counts": dict(self.counts)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.secret = bytes.fromhex(state["secret"])
        self.load(state["order"])
        self.counts.update(state["counts"])


def why_off(party, chain, budget: int, proposed: int) -> str | None:
    """Why this client's activations cannot be cached, or None. What arrives must be the same every time a
    sample is sent: no training, no randomness and nothing carried over from other crossings between the
    bottom's input and what the server receives (a defense in the chain says so through ``Transform.varies``)."""
    if proposed <= 0:
        return "cache.max_bytes is 0"
    if budget <= 0:
        return "the server allows no cache (splittune serve --max-cache-bytes 0)"
    session = party.session
    mode = session.segments.get("bottom")
    if mode != "frozen":
        return f"segments.bottom is {mode}: the bottom trains, so its activations change every step"
    if session.model_dropout:
        return "train.model_dropout is on: every forward drops other units"
    if party.trains(party.plan.segment("bottom")):
        return "a weight the bottom uses trains (one shared with a segment that trains)"
    if party.router is not None and party.plan.segment("bottom").blocks:
        return "the model adds a router loss, which needs the bottom's router sums of every step (models/routing.py)"
    width = party.model.config.get_text_config().hidden_size
    reason = chain.varies("up", "hidden", width)
    return None if reason is None else f"what crosses differs each time: {reason}"
