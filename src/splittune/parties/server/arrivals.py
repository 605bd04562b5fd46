"""A micro-batch's activations as they reach the server when the activation cache is on (``parties/cache.py``): the
rows the message carries, the others from what this client sent in earlier epochs. Nothing is stored until the
step is accepted (``commit``), so a refused message changes nothing."""

from __future__ import annotations

from typing import Callable

import torch

from ...wire import Message
from ..cache import CACHE_MISS, ActivationCache, entry_bytes
from ..protocol import ProtocolError, cached_in


def arrived(msg: Message, meta, cache: ActivationCache | None, width: int, dtype: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, Callable[[], None]]:
    """The full [rows, seq, width] activations of ``msg`` (whose ``meta.cache`` names its rows), and ``commit``."""
    c = meta.cache
    if cache is None:
        raise ProtocolError("the message uses the activation cache, but this session has none (cache.max_bytes is 0, "
                            "or the server allows none)", "FAILED_PRECONDITION")
    where = f"step {msg.step}, micro-batch {msg.micro}"
    sent, seq = cached_in(msg.tensors, c, width, dtype, where)
    carried = set(c.sent)
    lacking = [i for i, k in enumerate(c.keys) if i not in carried and (c.reset or k not in cache)]
    if lacking:
        raise ProtocolError(f"activation cache miss: this server holds no activations for rows {lacking[:8]} of {where}; "
                            "send them again", CACHE_MISS)
    full = torch.empty((len(c.keys), seq, width), dtype=dtype, device=device)
    for i, key in enumerate(c.keys):
        if i not in carried:
            row = cache.row(key)
            if tuple(row.shape) != (seq, width):
                raise ProtocolError(f"meta field 'cache.keys': key {key} names activations of {row.shape[0]} positions; "
                                    f"this micro-batch has {seq}")
            full[i] = row
    if sent is not None:
        full[c.sent] = sent

    def commit() -> None:
        if c.reset:
            cache.clear()
        rows = None if sent is None else [r.clone() for r in sent.detach()]
        cache.take(c.keys, c.sent, entry_bytes(seq, width, dtype), rows)

    return full, commit
