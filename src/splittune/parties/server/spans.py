"""The trunk cut into spans (``ray.trunk_spans: S``): the server's blocks [a, b) as S consecutive spans, the first in
the server's own party, each later one in a party of its own elsewhere (a Ray actor on its own resources: its own GPU
when the cluster has GPUs), the hidden state handed span to span.

``SpannedParty`` is what the server's group trains with: it answers as one party does (run, optimizer steps, state,
checkpoints) and keeps autograd whole across the spans. A later span's forward is an autograd function whose backward
asks that span for the gradient at its input, so one backward from the trunk's output reaches every span, and an
optimizer step clips with the gradient norm summed over every span: the unspanned trunk's step, span by span.
A span is reached through ``Span`` (what ``engines/ray_spans.py`` implements); this module imports nothing of Ray.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol

import torch

from ...models.arch import block_of
from ...models.segment import SegmentOutput
from ..party import Party, SessionSpec


class Span(Protocol):
    """A later span of the trunk: blocks [start, end), each with its own adapters and optimizers."""

    start: int
    end: int

    def forward(self, key: int | None, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...
    def backward(self, key: int, grad: torch.Tensor) -> torch.Tensor: ...
    def sq_grad_norm(self, adapter: str) -> float: ...
    def optimizer_step(self, total_sq_norm: float, adapter: str, skip: bool) -> None: ...
    def catch_up(self, step: int, adapter: str) -> None: ...
    def forget(self, adapter: str) -> None: ...
    def state(self, adapter: str) -> dict[str, torch.Tensor]: ...
    def load_state(self, tensors: dict[str, torch.Tensor], adapter: str) -> None: ...
    def checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]: ...
    def restore(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None: ...
    def holds(self, module: str) -> bool: ...
    def fold(self, module: str, delta: torch.Tensor) -> None: ...
    def info(self) -> dict[str, int]: ...


class SpanMaker(Protocol):
    """Makes the later spans (``engines/ray_spans.py``: Ray actors); ``count``: the spans in all, the first included."""

    count: int

    def make(self, spec: SessionSpec, start: int, end: int, adapters: tuple[str, ...], total_steps: int) -> Span: ...


def bounds(start: int, end: int, spans: int) -> list[tuple[int, int]]:
    """``spans`` consecutive ranges of blocks [start, end), as equal as whole blocks allow (the first ones larger)."""
    n = end - start
    if spans < 1 or spans > n:
        raise ValueError(f"ray.trunk_spans={spans} cannot cut the server's {n} block(s) [{start}, {end}): at most one span a block")
    sizes = [n // spans + (1 if k < n % spans else 0) for k in range(spans)]
    edges = [start + sum(sizes[:k]) for k in range(spans + 1)]
    return list(zip(edges[:-1], edges[1:]))


class _Across(torch.autograd.Function):
    """A later span's forward inside this process's graph: its backward asks the span for the gradient at its input."""

    @staticmethod
    def forward(ctx, hidden, span, key, mask):
        ctx.span, ctx.key = span, key
        return span.forward(key, hidden.detach(), mask)

    @staticmethod
    def backward(ctx, grad):
        return ctx.span.backward(ctx.key, grad.contiguous()), None, None, None


class SpannedParty:
    """The server's party for blocks [a, b) run as ``local`` (blocks [a, m)) and the later ``spans``."""

    def __init__(self, local: Party, spans: list[Span]):
        if local.router is not None:
            raise ValueError("ray.trunk_spans: a model with a router loss (mixture of experts) sums router figures over the "
                             "whole trunk; keep its trunk in one span (ray.trunk_spans: 1)")
        self.local, self.spans = local, spans
        self._keys = itertools.count()
        self.end = spans[-1].end if spans else local.segments[0].end

    def __getattr__(self, name: str):  # device, dtype, session, segments, blocks, model, trainers …: the local party's
        return getattr(self.local, name)

    # -- compute ----------------------------------------------------------------------------------------
    def run(self, start: int, end: int, *, routes=None, **kwargs) -> SegmentOutput:
        if routes is not None or kwargs.get("head") or end != self.end:
            raise ValueError(f"a spanned trunk runs its blocks [{start}, {self.end}) for one adapter (sfl-v1's batches, a "
                             "two-part split's head and other cuts need ray.trunk_spans: 1)")
        out = self.local.run(start, self.spans[0].start, **kwargs)
        hidden, mask = out.hidden, kwargs["attention_mask"]
        for span in self.spans:
            if torch.is_grad_enabled():
                hidden = _Across.apply(hidden, span, next(self._keys), mask)
            else:
                hidden = span.forward(None, hidden, mask)
        return SegmentOutput(hidden=hidden)

    def add_aux(self, loss: torch.Tensor, *parts) -> torch.Tensor:
        return loss

    # -- stage 6 -----------------------------------------------------------------------------------------
    def sq_grad_norm(self, adapter: str | None = None) -> float:
        adapter = adapter or self.local.adapter
        return self.local.sq_grad_norm(adapter) + sum(s.sq_grad_norm(adapter) for s in self.spans)

    def optimizer_step(self, total_sq_norm: float, adapter: str | None = None, skip: bool = False) -> None:
        adapter = adapter or self.local.adapter
        self.local.optimizer_step(total_sq_norm, adapter, skip)
        for span in self.spans:
            span.optimizer_step(total_sq_norm, adapter, skip)

    def catch_up(self, step: int, adapter: str | None = None) -> None:
        adapter = adapter or self.local.adapter
        self.local.catch_up(step, adapter)
        for span in self.spans:
            span.catch_up(step, adapter)

    def forget(self, adapter: str) -> None:
        """A vanished client's half-done step: the later spans drop their gradients and kept forwards too."""
        for span in self.spans:
            span.forget(adapter)

    # -- state --------------------------------------------------------------------------------------------
    def _owner(self, name: str):
        block = block_of(name, self.local.spec.blocks_path)
        return next((s for s in self.spans if block is not None and s.start <= block < s.end), self.local)

    def state(self, adapter: str | None = None) -> dict[str, torch.Tensor]:
        adapter = adapter or self.local.adapter
        merged = dict(self.local.state(adapter))
        for span in self.spans:
            merged.update(span.state(adapter))
        return merged

    def load_state(self, tensors: dict[str, torch.Tensor], adapter: str | None = None) -> None:
        adapter = adapter or self.local.adapter
        parts: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            parts.setdefault(id(self._owner(name)), {})[name] = t
        for holder in (self.local, *self.spans):
            if id(holder) in parts:
                holder.load_state(parts[id(holder)], adapter)

    def holds(self, module: str) -> bool:
        return self.local.holds(module) or any(s.holds(module) for s in self.spans)

    def fold(self, module: str, delta: torch.Tensor) -> None:
        (self.local if self.local.holds(module) else next(s for s in self.spans if s.holds(module))).fold(module, delta)

    def checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        groups, meta = self.local.checkpoint()
        meta["spans"] = []
        for k, span in enumerate(self.spans, 1):
            theirs, their_meta = span.checkpoint()
            groups.update({f"span{k}.{g}": t for g, t in theirs.items()})
            meta["spans"].append(their_meta)
        return groups, meta

    def restore(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        if len(meta.get("spans", [])) != len(self.spans):
            raise ValueError(f"the checkpoint holds the trunk in {len(meta.get('spans', [])) + 1} span(s), this server runs "
                             f"{len(self.spans) + 1}; resume with the same ray.trunk_spans")
        self.local.restore({g: t for g, t in groups.items() if not g.startswith("span")}, meta)
        for k, span in enumerate(self.spans, 1):
            prefix = f"span{k}."
            span.restore({g[len(prefix):]: t for g, t in groups.items() if g.startswith(prefix)}, meta["spans"][k - 1])

    # -- what a hello reports --------------------------------------------------------------------------------
    @property
    def trainable_params(self) -> int:
        return self.local.trainable_params + sum(s.info()["trainable"] for s in self.spans)

    @property
    def weights(self):
        from dataclasses import replace

        extra = [s.info() for s in self.spans]
        return replace(self.local.weights, params=self.local.weights.params + sum(e["params"] for e in extra),
                       bytes=self.local.weights.bytes + sum(e["bytes"] for e in extra))
