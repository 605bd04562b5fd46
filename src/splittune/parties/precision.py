"""Mixed precision across the cut: autocast over the weights, and float16 loss scaling both parties share.

``train.autocast`` runs each party's segments under ``torch.autocast``: matrix products in bfloat16 or
float16 over float32 weights, while adapters, optimizer state, norms and the loss stay float32 (what
``Trainer(bf16=True)`` does unsplit). What crosses the cut is cast back to the weights' dtype, so the
wire and the other party see the session's dtype whatever a block's last op computed in.

float16 has five exponent bits: small gradients underflow to zero. The client owns one dynamic
``LossScale`` (torch's ``GradScaler`` rule: start at 2¹⁶, halve on an overflow, double after 2000 clean
steps). The party that computes the loss multiplies it by the scale (the client; in a two-part split the
server, told the scale with each training forward), so every gradient on both sides is scaled. At the
step each party divides its own gradients by the scale and checks them; the step message carries the
scale and whether the client overflowed, the reply whether the server did, and an overflow anywhere skips
the step on both (gradients dropped, optimizer and LR schedule not advanced), exactly as GradScaler skips
``optimizer.step`` unsplit. A non-finite gradient never crosses the cut: its sender sends zeros instead and
remembers the overflow for the step.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch

INIT_SCALE = 2.0**16  # GradScaler's defaults
GROWTH_INTERVAL = 2000


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``'s kind (nothing when None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class LossScale:
    """The client's loss scale: dynamic (GradScaler's rule) unless ``fixed``."""

    scale: float = INIT_SCALE
    fixed: bool = False
    clean: int = 0  # clean steps since the scale last changed
    skipped: int = 0  # steps skipped for an overflow, over the run

    @classmethod
    def of(cls, setting: float | str) -> "LossScale":
        return cls(INIT_SCALE) if setting == "dynamic" else cls(float(setting), fixed=True)

    def update(self, overflow: bool) -> None:
        """After a step: halve on an overflow, double after ``GROWTH_INTERVAL`` clean steps (never when fixed)."""
        if overflow:
            self.skipped += 1
        if self.fixed:
            return
        if overflow:
            self.scale, self.clean = max(self.scale / 2, 1.0), 0
            return
        self.clean += 1
        if self.clean >= GROWTH_INTERVAL:
            self.scale, self.clean = self.scale * 2, 0

    def state(self) -> dict[str, Any]:
        return asdict(self)

    def load(self, state: dict[str, Any]) -> None:
        self.scale, self.fixed, self.clean, self.skipped = float(state["scale"]), bool(state["fixed"]), int(state["clean"]), int(state["skipped"])


def unscale(params: Iterable[torch.nn.Parameter], scale: float) -> bool:
    """Divide each gradient by ``scale`` in place; whether any holds a NaN or an Inf (an overflow)."""
    overflow = False
    for p in params:
        if p.grad is not None:
            p.grad.div_(scale)
            overflow = overflow or not bool(torch.isfinite(p.grad).all())
    return overflow


def finite(grad: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """A gradient fit to cross the cut and whether it overflowed: zeros in place of one holding NaN or Inf (its
    step is skipped anyway; a codec cannot carry it and the receiver would refuse it)."""
    if grad is None or bool(torch.isfinite(grad).all()):
        return grad, False
    return torch.zeros_like(grad), True
