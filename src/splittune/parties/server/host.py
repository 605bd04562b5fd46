"""Several runs on one server process (``splittune serve --max-runs N``): one ``Server`` per run, on one frozen base.

An operator with one GPU server and several customers hosts their runs at once. Each run is a ``Server`` of its
own: its group, adapters, optimizers, turn order, averages, trunk engine thread and checkpoint folder, so nothing
of one run is reachable from another: a message is served by the run its session was admitted to, and only by it.
What the runs share is what is the same for all of them: the pretrained frozen weights (``models/sharing.py``),
so a second run costs its adapters and activations, not a second trunk.

A training hello goes to the run it rejoins (a restarted client of a run under way), else to a forming run it
completes (same shared terms, an index still free), else it starts a run: in a slot whose clients have all
disconnected, or a new slot while fewer than ``max_runs`` exist; past that it is refused (``RESOURCE_EXHAUSTED``)
with the reason. Inference sessions are served beside every run, as a single server serves them.
"""

from __future__ import annotations

import threading
from typing import Callable

from ...models.sharing import FrozenBank
from ...wire import Message
from ..party import SessionSpec
from ..protocol import ProtocolError
from .handler import REFUSED, Server


Live = Callable[[str], bool]


def everyone(session: str) -> bool:
    return True


class Host:
    """``make(bank)``: a new run's ``Server`` on the shared frozen weights. ``live(session)``, where a method takes it:
    whether a session's client is still connected, as the gRPC service sees it for the hello at hand (a client
    restarting its own run does not count its lingering streams); by default every admitted session counts."""

    def __init__(self, make: Callable[[FrozenBank | None], Server], max_runs: int = 1):
        if max_runs < 1:
            raise ValueError(f"max_runs must be at least 1, got {max_runs}")
        self.max_runs = max_runs
        self.bank = FrozenBank() if max_runs > 1 else None
        self._make = make
        self.runs: list[Server] = [make(self.bank)]
        self.route: dict[str, Server] = {}  # session -> the run that admitted it
        self._lock = threading.Lock()

    # -- what the service, the CLI and a recording read of "the server" ---------------------------------
    @property
    def device(self):
        return self.runs[0].device

    @property
    def inference(self):
        return self.runs[0].inference

    @property
    def group(self):
        """The first run's group that exists (``health`` reports it as before; ``runs`` reports every run)."""
        return max(self.runs, key=lambda r: r.group is not None).group if len(self.runs) > 1 else self.runs[0].group

    @property
    def sessions(self) -> dict:
        """Every run's training sessions (session id -> its member)."""
        return {sid: m for run in self.runs for sid, m in run.sessions.items()}

    def trained_for(self, session: str):
        return self._run_of(session).trained_for(session)

    def cancel(self, reason: str) -> None:
        for run in self.runs:
            run.cancel(reason)

    def close(self) -> None:
        for run in self.runs:
            run.close()

    def disconnected(self, sessions) -> None:
        self.runs[0].disconnected(sessions)  # (inference sessions: the first run serves them)
        with self._lock:
            for session in sessions:
                self.route.pop(session, None)

    def rejoining(self, session: SessionSpec):
        return next((m for m in (r.rejoining(session) for r in self.runs) if m is not None), None)

    def health(self, live: Live = everyone) -> dict:
        """Each run slot: its clients, how many joined, its schedule, its connected sessions."""
        return {"runs": [{"clients": r.group.n if r.group else 0, "joined": len(r.group.members) if r.group else 0,
                          "schedule": r.group.schedule if r.group else None,
                          "sessions": sum(1 for s in r.sessions if live(s))} for r in self.runs],
                "max_runs": self.max_runs}

    # -- admission --------------------------------------------------------------------------------------
    def room_for(self, session: SessionSpec, live: Live = everyone) -> bool:
        """Whether a hello can be admitted now: it rejoins or completes a run, or a slot is free for the run it starts."""
        return (self.rejoining(session) is not None or self._forming(session, live) is not None
                or self._free(live) is not None or len(self.runs) < self.max_runs)

    def full(self, busy: list[str] | None = None) -> str:
        """Why a new run must wait (``busy``: the connected clients, where the service knows them by name)."""
        who = f" (clients {', '.join(busy)})" if busy else ""
        if self.max_runs == 1:
            return f"the server is serving another run{who}; a new run can start when its clients have disconnected"
        return (f"the server is serving its maximum of {self.max_runs} runs{who} (serve --max-runs); a new run can start "
                "when the clients of one have disconnected")

    def _forming(self, session: SessionSpec, live: Live) -> Server | None:
        """The run this hello joins while it forms (its group then checks the hello: the same terms, a free index).
        Serving one run, that is the forming run whatever it proposes (a mismatch is refused with the difference);
        serving several, a forming run with the same terms and a connected client (else the hello starts its own)."""
        for run in self.runs:
            group = run.group
            if group is None or group.formed or session.clients <= 1 or len(group.members) >= group.n:
                continue
            if self.max_runs == 1 or (group.terms == session.shared_terms()
                                      and any(live(m.session) for m in group.members.values())):
                return run
        return None

    def _free(self, live: Live) -> Server | None:
        """A slot no connected client uses: a finished or abandoned run's, taken over by a new run."""
        return next((r for r in self.runs if not any(live(s) for s in r.sessions)), None)

    def _place(self, msg: Message, session: SessionSpec, resume: int | None, live: Live):
        with self._lock:
            run, fresh = self._rejoined(session), None
            if run is None:
                run, fresh = self._forming(session, live), False
            if run is None:
                run, fresh = self._free(live), True
                if run is None and len(self.runs) < self.max_runs:
                    run = self._make(self.bank)
                    self.runs.append(run)
                if run is None:
                    raise ProtocolError(self.full(), "RESOURCE_EXHAUSTED")
            admitted = run.admit(msg, session, resume, fresh)
            self.route[msg.session] = run
        return run, admitted

    def _rejoined(self, session: SessionSpec) -> Server | None:
        return next((r for r in self.runs if r.rejoining(session) is not None), None)

    def _run_of(self, session: str) -> Server:
        """The run serving ``session`` (one that ended it explains why; else the first, which says it is unknown)."""
        run = self.route.get(session)
        if run is None:
            run = next((r for r in self.runs if session in r.ended), self.runs[0])
        return run

    # -- dispatch ---------------------------------------------------------------------------------------
    def handle(self, msg: Message, live: Live = everyone) -> Message:
        if msg.kind != "hello" or msg.meta.get("inference") is True:
            run = self.runs[0] if msg.kind == "hello" else self._run_of(msg.session)
            return run.handle(msg)
        run = None
        try:
            session, resume = self.runs[0].proposed(msg)
            run, (group, member, stale) = self._place(msg, session, resume, live)
            return run.welcome(msg, group, member, stale, resume)
        except REFUSED as err:
            return (run or self.runs[0]).refusal(msg, err)
