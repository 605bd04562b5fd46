"""Failures inside a model, named: which architecture, which stage (loading, the bottom, trunk or top's forward
or backward), which block.

An architecture nobody tried may fail deep inside transformers or torch (a shape that does not match in
attention). The user needs one line saying where, and the traceback only when asking for it (``--debug``):
the original error is chained, and its traceback is also kept here by message, because a server in the same
process sends a client only the text. splittune's own errors already say what is wrong and pass unchanged.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections import OrderedDict
from typing import Callable, Iterator

from .arch import ArchitectureError

_KEEP = 16  # tracebacks kept by message (text only: frames would keep their tensors alive)
_recent: OrderedDict[str, str] = OrderedDict()
_lock = threading.Lock()


class StageError(ArchitectureError):
    """An unexpected failure inside the model during one stage; the original error is its ``__cause__``.

    A ValueError (through ArchitectureError), so the server's handler refuses the message with this text and
    the client's error names the architecture and stage too."""


def own_error(err: BaseException) -> bool:
    """An error splittune raised on purpose (its own classes): already clear, never renamed."""
    return type(err).__module__.split(".", 1)[0] == "splittune"


def arch_name(model_type: str, ref: str | None = None) -> str:
    """``llama (tiny:llama)``: the architecture, and the model reference where known."""
    return f"{model_type} ({ref})" if ref and ref != model_type else model_type


def stage_failed(arch: str, stage: str, err: BaseException, blocks=None) -> StageError:
    """The one-line error for ``err`` raised during ``stage`` (in which of ``blocks``, when its traceback shows it);
    its traceback is recorded for ``traceback_for``."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 300:
        first = first[:300] + "…"
    block = failing_block(err, blocks) if blocks is not None else None
    inside = f" in block {block}" if block is not None else ""
    failure = StageError(f"{arch}: {stage} failed{inside}: {type(err).__name__}" + (f": {first}" if first else ""))
    text = "".join(traceback.format_exception(err))
    with _lock:
        _recent[str(failure)] = text
        _recent.move_to_end(str(failure))
        while len(_recent) > _KEEP:
            _recent.popitem(last=False)
    return failure


@contextlib.contextmanager
def stage_errors(arch: str, stage: str | Callable[[], str], blocks=None) -> Iterator[None]:
    """Rename an unexpected error raised inside as a :class:`StageError` of ``stage`` (a text, or a function
    computing it on failure only) naming which of ``blocks`` raised it. KeyboardInterrupt and splittune's own
    errors pass unchanged."""
    try:
        yield
    except Exception as err:
        if own_error(err):
            raise
        raise stage_failed(arch, stage() if callable(stage) else stage, err, blocks) from err


def segment_failures(party, start: int, end: int, *, head: bool | None = None, backward: bool = False):
    """``stage_errors`` for blocks [start, end) of ``party`` (a ``parties.Party``: its ``arch``, ``role``, ``plan``
    and ``blocks``): the forward, or with ``backward`` the backward of what that forward computed."""
    return stage_errors(party.arch, lambda: segment_stage(party, start, end, head, backward), party.blocks)


def segment_stage(party, start: int, end: int, head: bool | None = None, backward: bool = False) -> str:
    """``the trunk forward (blocks 2..3 and the head, server)``: which part of the split, which way, on which party."""
    plan = party.plan
    n = plan.n_blocks
    head = end == n if head is None else head
    if plan.shape == "centralized":
        name, role = "unsplit model", ""
    else:
        name = "trunk" if party.role == "server" else ("bottom" if start == 0 else "top")
        role = f", {party.role}"
    if end > start:
        where = f"block {start}" if end - start == 1 else f"blocks {start}..{end - 1}"
        where += " and the head" if head else ""
    else:
        where = "the embeddings" if start == 0 else "the final norm and head"
    return f"the {name} {'backward' if backward else 'forward'} ({where}{role})"


def loading_stage(role: str, plan) -> str:
    """``loading the bottom and top (client)``: the segments a party loads."""
    if plan.shape == "centralized":
        return "loading the unsplit model"
    names = [s.name for s in plan.party_segments(role)]
    return f"loading the {' and '.join(names)} ({role})"


def failing_block(err: BaseException, blocks) -> int | None:
    """The innermost of ``blocks`` whose code was running when ``err`` was raised (read from its traceback)."""
    index = {id(b): i for i, b in enumerate(blocks)}
    found, tb = None, err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in index:
            found = index[id(owner)]
        tb = tb.tb_next
    return found


def traceback_for(err: BaseException | None, message: str) -> str | None:
    """The traceback behind a stage failure that ``message`` reports; None when it reports none.

    ``err``'s own chain when it holds the StageError; else the one recorded in this process under a message
    that ``message`` contains (a server in this process relays only the text; a runner may prefix it)."""
    seen, e = set(), err
    while e is not None and id(e) not in seen:
        if isinstance(e, StageError) and e.__cause__ is not None:
            return "".join(traceback.format_exception(e))
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    with _lock:
        known = [m for m in _recent if m in message]
        return _recent[max(known, key=len)] if known else None
