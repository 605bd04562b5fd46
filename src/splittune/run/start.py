"""``train``: a run wherever its config puts its clients: in this process (``loop.train``: with the server here, in a
Ray actor or, for a client process, elsewhere) or spread over Ray client workers (``ray_clients``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig
from .loop import train as train_here
from .ray_clients import train_on_workers


def train(cfg: RunConfig, out: Path, progress: Callable | None = None, record_tap: tuple[str, ...] = (),
          tap_max_bytes: int = 1 << 30) -> dict[str, Any]:
    """Run ``cfg`` and write its run directory; returns the summary (``loop.train`` says what ``progress`` hears)."""
    if cfg.ray.client_workers and not record_tap:  # (a tap is refused on Ray by ``loop.train``, with the reason)
        return train_on_workers(cfg, out, progress)
    return train_here(cfg, out, progress, record_tap, tap_max_bytes)
