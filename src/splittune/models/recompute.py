"""Activation recomputation (gradient checkpointing) for a party's blocks, exact under the split.

Within ``recomputed(...)`` each listed block runs its forward under non-reentrant
``torch.utils.checkpoint``: autograd keeps only the block's inputs, and backward runs the block once
more to rebuild what it needs. Two things keep that exact here:

- the checkpoint wraps the block's ``forward``, not its ``__call__``: by the time the wrapped forward is
  entered, ``run_segment``'s inject hook has replaced the input by the tensor that crossed the cut, so
  the recompute (in backward, when the per-call hooks are gone) sees that tensor again. A checkpoint
  around ``__call__`` would recompute block ``start`` from the dummy prologue. (transformers' own switch,
  ``gradient_checkpointing_enable``, wraps ``forward`` too in recent versions, but it is a flag on the
  whole model, needs every block class to support it, and knows nothing of the call's routing below);
- whatever a call sets up around the model for its duration (``mixed_adapters``' routing of rows to
  adapters) is entered again around the recompute (``again``).

The RNG state is stashed and restored (``preserve_rng_state``), so dropout draws the same masks twice,
and the forward runs once, so the RNG stream is that of the run without recomputation. Only blocks
recompute; the prologue, final norm, head and loss keep what they save.

``saved_bytes`` measures what a forward leaves for its backward, with and without recomputation.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections.abc import Callable, Iterable
from typing import Any, ContextManager

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

_ledger = threading.local()  # the storages a running ``saved_bytes`` has seen (autograd's hooks are per thread too)


@contextlib.contextmanager
def recomputed(blocks: nn.ModuleList, indices: Iterable[int], again: Callable[[], ContextManager] = contextlib.nullcontext):
    """Within the context, a grad-mode forward of ``blocks[i]`` (``i`` in ``indices``) keeps only its inputs and
    runs again in backward, inside ``again()``."""
    wrapped = []
    for i in indices:
        block = blocks[i]
        own = block.__dict__.get("forward")  # an instance-level forward someone else set: put it back after
        block.forward = functools.partial(_checkpointed, block.forward, again)
        wrapped.append((block, own))
    try:
        yield
    finally:
        for block, own in wrapped:
            if own is None:
                del block.forward
            else:
                block.forward = own


def _checkpointed(forward: Callable, again: Callable[[], ContextManager], *args, **kwargs) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    kept = getattr(_ledger, "kept", None)
    if kept is not None:  # the checkpoint holds its inputs for the recompute: they count as saved
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                _note(kept, t)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), again()), **kwargs)


def _note(kept: dict[int, torch.Tensor], t: torch.Tensor) -> None:
    storage = t.untyped_storage()
    kept.setdefault(storage.data_ptr(), t)  # holding ``t`` keeps its address from being reused while counting


def saved_bytes(fn: Callable[[], Any], model: nn.Module | None = None) -> int:
    """Bytes that calling ``fn`` (a forward) leaves for backward: the tensors autograd saves and the inputs a
    recomputed block keeps, each storage counted once; ``model``'s parameters and buffers are not counted
    (they are resident anyway). Only what runs on the calling thread is seen."""
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        _note(kept, t)
        return t

    outer = getattr(_ledger, "kept", None)
    _ledger.kept = kept
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        _ledger.kept = outer
    resident = set()
    if model is not None:
        resident = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(t.untyped_storage().nbytes() for ptr, t in kept.items() if ptr not in resident)
