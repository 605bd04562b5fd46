"""The operator's page (``splittune serve --dashboard HOST:PORT``): the sessions the server holds (client id, run,
step, last seen, bytes, the agreed chain and the announced defenses), its inference sessions, memory, the requests
it refused by reason, and the tap's size when it records one.

``Watch`` is fed by the service as it handles messages (a few hooks in ``service.py``) and keeps only what the page
shows: ids, counts, times, the hello's public terms. Never a tensor, never a token: the page is for people who run
the server, and it shows them nothing a client did not announce to the server.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..device import peak_memory
from ..parties.protocol import bounded
from ..track.dashboard.http import DashboardError, Running, serve

if TYPE_CHECKING:
    from .service import SplitService

REMEMBER_CLOSED = 32  # sessions the page still lists after their stream ended


def _public(entry: dict) -> dict:
    """A chain term or a defense as the page shows it: never a seed or a secret (announced terms carry none; this
    keeps it so)."""
    return {k: v for k, v in entry.items() if "seed" not in k and "secret" not in k}


class Watch:
    """What the service saw, per session and in total, for the operator's page."""

    def __init__(self):
        self._lock = threading.Lock()
        self.sessions: dict[str, dict[str, Any]] = {}
        self.closed: dict[str, dict[str, Any]] = {}
        self.refusals: Counter = Counter()
        self.last_refusal: dict[str, dict] = {}

    def message(self, session: str, kind: str, step: int, nbytes: int, error: bool, client: str, meta: dict) -> None:
        """A message the service handled (an accepted hello opens the session's entry: who, which run, what it
        announced)."""
        if kind == "hello" and not error:
            self._hello(client, session, meta)
        with self._lock:
            entry = self.sessions.get(session)
            if entry is None:
                return
            entry["messages"] += 1
            entry["bytes_in"] += nbytes
            entry["last_seen"] = time.time()
            entry["last_kind"] = bounded(str(kind), 40)
            entry["errors"] += error
            if kind in ("activations", "gradients", "step") and isinstance(step, int) and step > (entry["step"] or 0):
                entry["step"] = step
        if kind == "close" and not error:  # an inference session ended on a stream that stays open
            self.disconnected([session])

    def _hello(self, client: str, session: str, meta: dict) -> None:
        defenses = meta.get("defenses") if isinstance(meta.get("defenses"), list) else []
        entry = {"session": bounded(str(session), 80), "client_id": client, "inference": meta.get("inference") is True,
                 "client": meta.get("client") if isinstance(meta.get("client"), int) else None,
                 "clients": meta.get("clients") if isinstance(meta.get("clients"), int) else None,
                 "run": bounded(str(meta.get("run_id") or ""), 40), "schedule": bounded(str(meta.get("schedule") or ""), 40),
                 "model": bounded(str(meta.get("model") or ""), 120), "steps": _count(meta.get("steps")),
                 "defenses": [_public(d) for d in defenses if isinstance(d, dict)],
                 "secure_aggregation": meta.get("secure_aggregation") is True,
                 "opened": time.time(), "last_seen": time.time(), "step": _count(meta.get("resume")) or 0, "messages": 0,
                 "bytes_in": 0, "bytes_out": 0, "errors": 0}
        with self._lock:
            self.sessions[session] = entry

    def sent(self, session: str, nbytes: int) -> None:
        with self._lock:
            if session in self.sessions:
                self.sessions[session]["bytes_out"] += nbytes

    def refused(self, code: str | None, reason: str) -> None:
        """A refused request, counted by its gRPC status (a token refusal: UNAUTHENTICATED)."""
        code = code or "UNAUTHENTICATED"
        with self._lock:
            self.refusals[code] += 1
            self.last_refusal[code] = {"reason": bounded(str(reason), 300), "t": time.time()}

    def disconnected(self, sessions) -> None:
        with self._lock:
            for session in sessions:
                entry = self.sessions.pop(session, None)
                if entry is not None:
                    self.closed[session] = {**entry, "ended": time.time()}
            while len(self.closed) > REMEMBER_CLOSED:
                self.closed.pop(next(iter(self.closed)))

    def copy(self) -> tuple[list[dict], list[dict], dict, dict]:
        with self._lock:
            return ([dict(e) for e in self.sessions.values()], [dict(e) for e in self.closed.values()], dict(self.refusals),
                    {k: dict(v) for k, v in self.last_refusal.items()})


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def snapshot(service: "SplitService", recording=None) -> dict[str, Any]:
    """The operator page's state: the service's counts and owners (under its lock), the watch's sessions, the
    server's run, inference sessions, memory, the tap."""
    with service._lock:
        owners, pending, counts = dict(service.owner), service.pending, dict(service.counts)
    sessions, closed, refusals, last = service.watch.copy()
    chains = service.link.chains
    for entry in sessions:
        chain = chains.get(entry["session"]) if entry["session"] in owners else None
        entry["chain"] = {d: [_public(t) for t in chain.terms.get(d, [])] for d in ("up", "down")} if chain is not None else None
        entry["connected"] = entry["session"] in owners
    runs = getattr(service.server, "runs", None) or [service.server]  # (a host of several runs, or one server)
    out = {
        "now": time.time(), "uptime_s": round(time.time() - service.started, 1), "pending": pending, **counts,
        "runs": [{"clients": g.n, "joined": len(g.members), "schedule": g.schedule, "steps": g.steps}
                 for g in (r.group for r in runs) if g is not None],
        "sessions": [e for e in sessions if not e["inference"]], "inference_sessions": [e for e in sessions if e["inference"]],
        "ended": closed[::-1], "refused_by_reason": [{"code": k, "count": v, **last.get(k, {})} for k, v in sorted(refusals.items())],
        "inference": service.server.inference.health(), "memory": {**peak_memory(service.server.device), "rss_now_bytes": _rss()},
        "tap": _tap(recording),
    }
    return out


def _rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None


def _tap(recording) -> dict | None:
    if recording is None:
        return None
    return {"folder_name": recording.folder.name, "observers": {o: {"bytes": w.stored, "max_bytes": w.max_bytes, "dropped": w.dropped}
                                                                 for o, w in recording.writers.items()}}


class OperatorPage:
    """``serve --dashboard HOST:PORT``: bound before the model loads (a busy port or a missing token fails in a second),
    showing the service once ``attach`` hands it over."""

    def __init__(self, listen: str, token: str | None):
        self.service: "SplitService | None" = None
        self.recording = None
        self.running: Running = serve(listen, "server.html", {"server": self.state}, token, "--dashboard")

    def attach(self, service: "SplitService", recording=None) -> None:
        self.service, self.recording = service, recording

    def state(self, query: dict) -> dict:
        if self.service is None:
            raise DashboardError("the server is still loading its model")
        return snapshot(self.service, self.recording)

    def stop(self) -> None:
        self.running.stop()
