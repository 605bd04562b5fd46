"""How many CPU threads a process computes with (``train.threads``, ``serve --threads``).

torch's intra-op pool is process-wide and by default as large as the machine. When parties of one process
compute at the same time (several in-process clients, or a pipelined client computing while the server does),
each would take the whole pool and oversubscribe the cores (tiny runs under contention slowed 3-12x), so
``auto`` gives them half the cores (at most ``SHARED_CAP``). When one party computes at a time (a client taking
turns with its server, a lone party: centralized, a client of a remote server, ``splittune serve``) it takes
every core (``run.loop.computes_concurrently`` decides which).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

SHARED_CAP = 8  # beyond this a small model gains little from more intra-op threads


@contextlib.contextmanager
def enrolled(members: list, member, lock) -> Iterator:
    """``member`` in ``members`` (a list guarded by ``lock``) while the block runs, then taken out by identity (an
    equal member is another's): how a block measures what passes while it runs without diffing shared counters."""
    with lock:
        members.append(member)
    try:
        yield member
    finally:
        with lock:
            members[:] = [m for m in members if m is not member]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def resolve_threads(setting: int | str, shared: bool) -> int:
    """``setting`` (``auto`` or a count) for a process whose parties share it (``shared``) or not."""
    if setting != "auto":
        return int(setting)
    cores = available_cores()
    return max(1, min(cores // 2, SHARED_CAP)) if shared else cores


@contextlib.contextmanager
def compute_threads(setting: int | str, shared: bool) -> Iterator[int]:
    """Compute with the resolved thread count inside the block; the previous count is restored after it."""
    n = resolve_threads(setting, shared)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
