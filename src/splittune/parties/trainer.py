"""One adapter's trainable tensors with its optimizer and LR schedule (a party may hold several, ``party.py``).

Gradient clipping is *global*: each party contributes the squared norm of its own gradients, the sum gives the
norm of the whole model's gradient, and every party scales by the same coefficient, exactly as
``clip_grad_norm_`` on the unsplit model would.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
from transformers import get_scheduler

from ..device import as_float64
from .precision import LossScale

if TYPE_CHECKING:
    from .party import SessionSpec


class Trainer:
    """One adapter's trainable tensors with its own AdamW and LR schedule (a party may hold several)."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], session: SessionSpec, total_steps: int,
                 scale: LossScale | None = None):
        self.named = params
        self.params = [p for _, p in params]
        self.max_grad_norm = session.max_grad_norm
        self.scale = scale  # the client's float16 loss scale (``parties/precision.py``); None elsewhere
        self.optimizer = torch.optim.AdamW(self.params, lr=session.lr, weight_decay=session.weight_decay) if self.params else None
        self.scheduler = (
            get_scheduler(session.lr_schedule, self.optimizer, num_warmup_steps=session.warmup_steps, num_training_steps=total_steps)
            if self.optimizer
            else None
        )

    def sq_grad_norm(self) -> float:
        """Sum of squared gradient norms of these tensors (float64 for a stable sum)."""
        total = 0.0
        for p in self.params:
            if p.grad is not None:
                total += float(torch.linalg.vector_norm(as_float64(p.grad.detach())) ** 2)
        return total

    def step(self, total_sq_norm: float, skip: bool = False) -> None:
        """Clip by the global norm, step, advance the LR schedule, clear gradients; ``skip`` (a float16 overflow on
        either party) only clears them."""
        if skip:
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            return
        if self.max_grad_norm is not None and self.params:
            coef = self.max_grad_norm / (math.sqrt(total_sq_norm) + 1e-6)
            if coef < 1.0:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        if self.optimizer is not None:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0] if self.scheduler else 0.0

    def catch_up(self, step: int) -> None:
        """Advance the LR schedule to where step ``step`` begins: a client (or its sfl-v1 server adapter) that rounds
        did not sample trains at the run's rate of the step, as every sampled client does."""
        if self.scheduler is None:
            return
        with warnings.catch_warnings():  # stepping a schedule without its optimizer is the point here
            warnings.simplefilter("ignore", UserWarning)
            while self.scheduler.last_epoch < step - 1:
                self.scheduler.step()

    def forget(self, names: set[str]) -> None:
        """Drop the optimizer's moments of ``names``: their values were replaced, the moments refer to the old ones."""
        if self.optimizer is not None:
            for name, p in self.named:
                if name in names:
                    self.optimizer.state.pop(p, None)
