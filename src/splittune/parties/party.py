"""What every party has: its segments' weights, what they train, its optimizer and LR schedule.

Stage 6 (optimizer steps) lives here. Gradient clipping is *global*: each party contributes the
squared norm of its own gradients, the sum gives the norm of the whole model's gradient, and both
parties scale by the same coefficient, exactly as ``clip_grad_norm_`` on the unsplit model would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import get_scheduler

from ..config import LoraConfig, RunConfig
from ..models.adapters import apply_training, trainable, trainable_state
from ..models.arch import ArchSpec
from ..models.partition import DTYPES, SplitPlan, load_party_model, plan_split
from ..models.segment import SegmentOutput, run_segment
from ..models.zoo import ModelSource


@dataclass(frozen=True)
class SessionSpec:
    """Everything both parties must agree on; the client proposes it in its hello."""

    fingerprint: str
    model_type: str
    cuts: list[int]
    mode: str
    segments: dict[str, str]
    lora: dict[str, Any]
    seed: int
    dtype: str
    lr: float
    weight_decay: float
    warmup_steps: int
    schedule: str
    steps: int
    max_grad_norm: float | None
    model_dropout: bool

    @classmethod
    def from_run(cls, cfg: RunConfig, fingerprint: str, model_type: str) -> "SessionSpec":
        t = cfg.train
        return cls(
            fingerprint, model_type, list(cfg.cuts), cfg.mode, cfg.segments.model_dump(), cfg.lora.model_dump(),
            cfg.seed, t.dtype, t.lr, t.weight_decay, t.warmup_steps, t.schedule, t.steps, t.max_grad_norm, t.model_dropout,
        )

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "SessionSpec":
        fields = set(cls.__dataclass_fields__)
        missing = fields - set(meta)
        if missing:
            raise ValueError(f"session proposal lacks {sorted(missing)}")
        return cls(**{k: meta[k] for k in fields})

    def plan(self, n_blocks: int) -> SplitPlan:
        return plan_split(n_blocks, self.cuts, self.mode)


class Party:
    """One side of the split: ``role`` is ``client`` or ``server``."""

    def __init__(self, role: str, source: ModelSource, spec: ArchSpec, session: SessionSpec, config=None):
        self.role = role
        self.spec = spec
        self.session = session
        self.plan = session.plan(spec.n_blocks)
        self.segments = self.plan.party_segments(role)
        self.dtype = DTYPES[session.dtype]
        _check_tied(spec, self.plan, session.segments)
        model, self.weights = load_party_model(
            source,
            config if config is not None else source.config(),
            spec,
            [i for s in self.segments for i in s.blocks],
            pre=any(s.embeds for s in self.segments),
            post=any(s.head for s in self.segments),
            dtype=self.dtype,
            keep_dropout=session.model_dropout,
        )
        modes = [(s, session.segments[s.name]) for s in self.segments]
        self.model = apply_training(model, spec, modes, LoraConfig(**session.lora), session.seed)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.blocks = base.get_submodule(spec.blocks_path)
        self.model.train()
        self.params = [p for _, p in trainable(self.model)]
        self.optimizer = torch.optim.AdamW(self.params, lr=session.lr, weight_decay=session.weight_decay) if self.params else None
        self.scheduler = (
            get_scheduler(session.schedule, self.optimizer, num_warmup_steps=session.warmup_steps, num_training_steps=session.steps)
            if self.optimizer
            else None
        )

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def run(self, start: int, end: int, **kwargs) -> SegmentOutput:
        return run_segment(self.model, self.blocks, start, end, **kwargs)

    def sq_grad_norm(self) -> float:
        """Sum of squared gradient norms of this party's trainable tensors (float64 for a stable sum)."""
        total = 0.0
        for p in self.params:
            if p.grad is not None:
                total += float(torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) ** 2)
        return total

    def optimizer_step(self, total_sq_norm: float) -> None:
        """Clip by the global norm, step, advance the LR schedule, clear gradients."""
        max_norm = self.session.max_grad_norm
        if max_norm is not None and self.params:
            coef = max_norm / (math.sqrt(total_sq_norm) + 1e-6)
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

    @property
    def fan_in_fan_out(self) -> bool | None:
        """Whether this party's LoRA layers wrap transposed (Conv1D) weights; None without LoRA."""
        config = getattr(self.model, "peft_config", {}).get("default")
        return None if config is None else bool(config.fan_in_fan_out)

    def state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.model)


def _check_tied(spec: ArchSpec, plan: SplitPlan, modes: dict[str, str]) -> None:
    """A tied embedding/head split across parties cannot be trained: the two copies would drift apart."""
    if not spec.tied or plan.shape != "two-part":
        return
    for name in ("bottom", "trunk"):
        if modes.get(name) == "full":
            raise ValueError(
                f"{spec.model_type} ties its head to the embeddings, and a two-part split puts them on different parties; "
                f"segments.{name}=full would train two diverging copies. Use lora or frozen for {name}, or a U-shaped split"
            )
