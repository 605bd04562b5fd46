"""One process at a time in a run directory (``train --out``, ``compare --out``, ``serve --state``).

The directory holds a lock file, ``.lock``, with who holds it (pid, host, since when, command). The owner
holds an ``flock`` on it for the life of the run, so the kernel releases it when the process dies, however
it dies. A second process that finds the lock held is refused at once, with the first one named. A lock
file that is not held but not empty was left by a process that died without releasing it (killed, power
cut): it is taken over with a notice. A clean release empties the file; it is never deleted (deleting it
would let two processes lock two different files of the same name).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from .errors import SplittuneError
from .config import warn

LOCK = ".lock"


class RunDirError(SplittuneError, RuntimeError):
    """A run directory another process is using."""


def _describe(owner: dict) -> str:
    pid, host = owner.get("pid", "?"), owner.get("host", "?")
    since = owner.get("since", "an unknown time")
    command = owner.get("command")
    return f"pid {pid} on {host} since {since}" + (f" ({command})" if command else "")


class RunLock:
    """``with RunLock(out):`` holds ``out/.lock`` (creating ``out``) until the block ends, errors included."""

    def __init__(self, folder: Path | str, what: str = "run"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.what = what
        self._fd: int | None = None
        self.took_over: dict | None = None  # the dead owner whose lock this one took over

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            raise RunDirError(f"{self.folder} is already locked by this {self.what}")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd)
            os.close(fd)
            raise RunDirError(
                f"{self.folder} is in use by another {owner.get('what', 'run')}: {_describe(owner)}; "
                f"wait for it to finish, stop it, or use another directory"
            ) from None
        previous = _read(fd)
        if previous:
            self.took_over = previous
            warn(f"{self.folder}: taking over the lock of a {previous.get('what', 'run')} that is gone ({_describe(previous)}); "
                 "it stopped without releasing it")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                 "command": shlex.join(sys.argv), "what": self.what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # empty: released cleanly (a later run takes it without a notice)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    """The owner recorded in a lock file ({} when it is empty); a file that is not ours to parse says so."""
    size = os.fstat(fd).st_size
    if not size:
        return {}
    text = os.pread(fd, min(size, 65536), 0).decode(errors="replace").strip()
    if not text:
        return {}
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return {"command": f"an unreadable lock file: {text[:80]!r}"}
    return owner if isinstance(owner, dict) else {"command": repr(owner)[:80]}
