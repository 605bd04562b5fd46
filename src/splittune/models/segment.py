"""Run blocks [start, end) of a model through the model's *own* forward.

Whatever a given architecture does around its blocks (masks, sliding windows, rotary or learned
positions, embedding scaling, soft-capping, the loss) stays transformers' code. Two forward
pre-hooks are all the split needs:

- *inject* on block ``start``: its input hidden state is replaced by the tensor that crossed the cut;
  everything the model computed before it (from dummy token ids) is discarded, and blocks before
  ``start`` are swapped for weightless stubs for the duration of the call;
- *exit* on block ``end``: its input (the output of block ``end - 1``) is captured and the forward is
  stopped, so the norm and head never run on a segment that does not end the model.

At the model's end the same two hooks sit on the first *post* module to run (the final norm, or the head
where there is none) instead of a block: a top of only the norm and head (``start`` = the block count)
injects there, and the segment before it (ending at the last block, without the head) exits there. Blocks
return different shapes (a tensor, a tuple) and the model's loop unpacks them its own way, so the input of
the module after them is the one place the hidden state has the same form in every architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .partition import AbsentBlock


class _SegmentExit(Exception):
    """Raised by the exit hook to stop the model's forward at a cut."""


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _before(where: nn.Module | Sequence[nn.Module], hook) -> list:
    """``hook`` as a forward pre-hook on ``where``: one module, or of several the first to run (the post modules,
    whose order of execution the spec does not record)."""
    if isinstance(where, nn.Module):
        return [where.register_forward_pre_hook(hook, with_kwargs=True)]
    fired: list[bool] = []

    def first(module, args, kwargs):
        if not fired:
            fired.append(True)
            return hook(module, args, kwargs)
        return None

    return [m.register_forward_pre_hook(first, with_kwargs=True) for m in where]


@dataclass
class SegmentOutput:
    hidden: torch.Tensor | None = None  # activations at the end cut (segments that do not end the model)
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    router: torch.Tensor | None = None  # this segment's router sums for the auxiliary loss (models/routing.py)


def run_segment(
    model: nn.Module,
    blocks: nn.ModuleList,
    start: int,
    end: int,
    *,
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    want_logits: bool = False,
    head: bool | None = None,
    post: Sequence[nn.Module] = (),
    forward_kwargs: dict | None = None,
) -> SegmentOutput:
    """Forward blocks [start, end) and the head when ``head`` (by default: when ``end`` is the last block).

    ``input_ids`` enter at the embeddings (``start == 0``); or ``hidden`` enters at block ``start``
    and dummy ids of the same shape feed the (discarded) prologue. ``post``: the modules after the blocks
    (``ArchSpec.post``), needed by a segment that starts or stops where the blocks end. ``forward_kwargs`` go to
    the model's forward as they are (e.g. ``output_router_logits=False``: the split adds the router loss itself).
    """
    n = len(blocks)
    head = end == n if head is None else head
    if head and end < n:
        raise ValueError(f"a segment ending at block {end} of {n} cannot run the head")
    if start == end == n and (hidden is None or not head):
        raise ValueError("a segment after the last block is the head alone: it needs the hidden state and runs the head")
    if (start == n or (end == n and not head)) and not post:
        raise ValueError("a segment that starts or stops where the blocks end needs the model's post modules")
    if (hidden is None) == (input_ids is None):
        raise ValueError("give a segment either input_ids (it starts at the embeddings) or hidden (it starts at a cut)")
    if hidden is None and start > 0:
        raise ValueError(f"a segment starting at block {start} needs the hidden state from the previous cut")
    ids = input_ids if hidden is None else torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    box: dict[str, torch.Tensor] = {}
    handles, swapped = [], {}

    if hidden is not None:
        stub = next((b for b in blocks if isinstance(b, AbsentBlock)), AbsentBlock())  # a party lacks some block
        for i in range(start):
            if not isinstance(blocks[i], AbsentBlock):
                swapped[i] = blocks[i]
                blocks[i] = AbsentBlock(swapped[i], stub.block_tuple, i)

        def inject(module, args, kwargs):
            return _with_hidden(args, kwargs, hidden)

        handles += _before(blocks[start] if start < n else post, inject)

    def exit_(module, args, kwargs):
        box["hidden"] = _hidden_of(args, kwargs)
        raise _SegmentExit

    if end < n:
        handles += _before(blocks[end], exit_)
    elif not head:
        handles += _before(post, exit_)
    kwargs = {"use_cache": False, **(forward_kwargs or {})}
    if labels is not None and num_items_in_batch is not None:
        kwargs["num_items_in_batch"] = num_items_in_batch
    try:
        out = model(input_ids=ids, attention_mask=attention_mask, labels=labels, **kwargs)
    except _SegmentExit:
        return SegmentOutput(hidden=box["hidden"])
    finally:
        for h in handles:
            h.remove()
        for i, block in swapped.items():
            blocks[i] = block
    if not head:
        raise RuntimeError(f"the forward finished without reaching block {end}; the model skipped its blocks")
    return SegmentOutput(loss=out.loss, logits=out.logits if want_logits else None)
