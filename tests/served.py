"""Served processes for tests: ``splittune serve`` and client commands as separate processes on loopback.

A served process listens on a port the kernel picks (``--listen 127.0.0.1:0``) and says which in its first line,
so parallel test workers never race for a port.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CLI = [sys.executable, "-m", "splittune.cli"]
LISTENING = re.compile(r"listening on (grpcs?://\S+)")


def free_port() -> int:
    """A port free now (for tests of the listening rules themselves; servers take port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


class Served:
    """One ``splittune serve`` process; ``url`` once it answers ``health``; its log in ``log``."""

    def __init__(self, log: Path, *extra: str, model: str = "tiny:llama"):
        from splittune.deploy.service import health

        self.log = log
        self.proc = subprocess.Popen([*CLI, "serve", "--model", model, "--listen", "127.0.0.1:0", *extra],
                                     stdout=subprocess.PIPE, stderr=open(log, "a"), text=True)
        first = self.proc.stdout.readline()  # the banner names the port the kernel gave
        found = LISTENING.search(first)
        if found is None:
            self.proc.kill()
            raise RuntimeError(f"serve did not start: {first}{log.read_text()}")
        self.url = found[1].rstrip("·").strip()
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # a full pipe would block the server
        deadline = time.time() + 60
        while True:
            try:
                health(self.url, timeout_s=1)
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(log.read_text()) from None
                time.sleep(0.1)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve_here(service, tls=None, insecure: bool = False, host: str = "127.0.0.1"):
    """``service`` served in this process on a port the kernel picks; returns (grpc server, port)."""
    from splittune.channels.transport import parse_listen
    from splittune.deploy.service import bind, start

    bound, address = bind(parse_listen(f"{host}:0"), tls, insecure, service.limits.streams)
    return start(service, address, tls, insecure, bound=bound), address.port
