"""The worker threads splittune starts (the server's trunk engine, the local channel's server side, an
emulated link's timer) are stopped and joined before the interpreter exits.

They are daemon threads, so a forgotten one never keeps a process alive; but a daemon thread still running
when the interpreter tears down can meet libraries' static destructors (torch's thread pools), which abort
the process ("terminate called without an active exception") after a run that succeeded.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import Callable

_workers: list[tuple[weakref.ref, Callable[[], None]]] = []
_lock = threading.Lock()


def start(target: Callable, args: tuple, name: str, stop: Callable[[], None]) -> threading.Thread:
    """Start a daemon worker; ``stop`` (which must not refer to the worker's owner) makes it return."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    with _lock:
        _workers[:] = [(t, s) for t, s in _workers if t() is not None and t().is_alive()]
        _workers.append((weakref.ref(thread), stop))
    return thread


@atexit.register
def stop_all(timeout_s: float = 2.0) -> None:
    with _lock:
        live = [(t(), s) for t, s in _workers if t() is not None]
    for thread, stop in live:
        if thread.is_alive():
            stop()
    for thread, _ in live:
        thread.join(timeout_s)
