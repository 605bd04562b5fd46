"""What a client step reports (``StepReport``), and the bytes a block of its work sent (``Traffic``): the loop and the
bench aggregate reports rather than reading or resetting the client's counters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Traffic:
    """The bytes a client's link carried each way during a block (``Client.traffic``)."""

    up: int = 0
    down: int = 0


@dataclass
class StepReport:
    """What one client step did, reported by the client itself: the loss over its ``tokens``, the learning rate, the
    bytes each way, its wall time; split runs add where the time went (``link``: ``LinkStats.take()``), the bottom's
    forward time and the defense penalty summed into its loss; with the activation cache, its hits and misses."""

    loss: float
    tokens: int
    lr: float
    bytes_up: int = 0
    bytes_down: int = 0
    step_s: float = 0.0
    link: dict | None = None
    bottom_s: float = 0.0
    penalty: float = 0.0
    cache_hits: int | None = None
    cache_misses: int | None = None
