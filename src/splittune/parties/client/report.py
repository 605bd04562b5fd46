"""What a client step reports (``StepReport``); the bytes a block of its work sent are its channel's ``Traffic``. The
loop and the bench aggregate reports rather than reading or resetting the client's counters."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...channels import Traffic

__all__ = ["StepReport", "Traffic"]


@dataclass
class StepReport:
    """What one client step did, reported by the client itself: the loss over its ``tokens``, the learning rate, the
    bytes each way, its wall time; split runs add where the time went (``link``: the step's ``LinkStats.figures()``), the bottom's
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
    figures: dict[str, float] = field(default_factory=dict)  # the defenses' own figures for the step's row (nopeek_dcor)
    cache_hits: int | None = None
    cache_misses: int | None = None
    loss_scale: float | None = None  # float16: the scale the step's gradients carried
    skipped: bool = False  # float16: a gradient overflowed on a party, so neither stepped
