"""How many CPU threads a process computes with (``train.threads``, ``serve --threads``).

torch's intra-op pool is process-wide and by default as large as the machine. An in-process run holds the
client(s) and the server in one process, taking turns, and shares the machine with whatever else runs on
it: a full-size pool oversubscribes the cores, and tiny runs under contention slowed 3-12x. ``auto`` takes
half the cores (at most ``SHARED_CAP``) when parties share the process, and every core for a lone party (a
client of a remote server, ``splittune serve``), which has the process to itself.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

SHARED_CAP = 8  # beyond this a small model gains little from more intra-op threads


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
