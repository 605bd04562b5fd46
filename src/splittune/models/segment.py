"""Run blocks [start, end) of a model through the model's *own* forward.

Whatever a given architecture does around its blocks (masks, sliding windows, rotary or learned
positions, embedding scaling, soft-capping, the loss) stays transformers' code. Two forward
pre-hooks are all the split needs:

- *inject* on block ``start``: its input hidden state is replaced by the tensor that crossed the cut;
  everything the model computed before it (from dummy token ids) is discarded, and blocks before
  ``start`` are swapped for weightless stubs for the duration of the call;
- *exit* on block ``end``: its input (the output of block ``end - 1``) is captured and the forward is
  stopped, so the norm and head never run on a segment that does not end the model.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class SegmentOutput:
    hidden: torch.Tensor | None = None  # activations at the end cut (segments that do not end the model)
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def run_segment(
    model: nn.Module,
    blocks: nn.ModuleList,
    start: int,
    end: int,
    *,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    want_logits: bool = False,
) -> SegmentOutput:
    """Forward blocks [start, end) (and the head when ``end`` is the last block).

    ``input_ids`` enter at the embeddings (``start == 0``); or ``hidden`` enters at block ``start``
    and dummy ids of the same shape feed the (discarded) prologue.
    """
    n = len(blocks)
    if (hidden is None) == (input_ids is None):
        raise ValueError("give a segment either input_ids (it starts at the embeddings) or hidden (it starts at a cut)")
    if hidden is None and start > 0:
        raise ValueError(f"a segment starting at block {start} needs the hidden state from the previous cut")
    ids = input_ids if hidden is None else torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    box: dict[str, torch.Tensor] = {}
    handles, swapped = [], {}

    if hidden is not None:
        for i in range(start):
            if not isinstance(blocks[i], AbsentBlock):
                swapped[i] = blocks[i]
                blocks[i] = AbsentBlock(swapped[i])

        def inject(module, args, kwargs):
            return _with_hidden(args, kwargs, hidden)

        handles.append(blocks[start].register_forward_pre_hook(inject, with_kwargs=True))
    if end < n:

        def exit_(module, args, kwargs):
            box["hidden"] = _hidden_of(args, kwargs)
            raise _SegmentExit

        handles.append(blocks[end].register_forward_pre_hook(exit_, with_kwargs=True))
    kwargs = {}
    if labels is not None and num_items_in_batch is not None:
        kwargs["num_items_in_batch"] = num_items_in_batch
    try:
        out = model(input_ids=ids, attention_mask=attention_mask, labels=labels, use_cache=False, **kwargs)
    except _SegmentExit:
        return SegmentOutput(hidden=box["hidden"])
    finally:
        for h in handles:
            h.remove()
        for i, block in swapped.items():
            blocks[i] = block
    if end < n:
        raise RuntimeError(f"the forward finished without reaching block {end}; the model skipped its blocks")
    return SegmentOutput(loss=out.loss, logits=out.logits if want_logits else None)
