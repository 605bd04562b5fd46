"""Coordination on the server when several clients train at once: turns and meeting points.

Parties may run in one process (threads) or many (gRPC handlers); either way the server serves
requests in a fixed order, so a run is deterministic whatever order the requests arrive in.

- :class:`Turnstile` serves training messages in a fixed order of ``(client, step)`` turns
  (``sequential`` and ``sfl-v2``: the shared server-side adapter is updated by one client at a time).
- :class:`Rendezvous` lets every client of a round arrive with its part; the last to arrive computes
  for all (``sfl-v1``'s batched forward, an adapter average), and each gets its own share back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from ..protocol import WaitTimeout


class _Waits:
    """What every waiting place shares: a condition, a time limit, and a way to call the waiting off."""

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self.cancelled: str | None = None
        self._cond = threading.Condition()

    def cancel(self, reason: str) -> None:
        """Wake every waiting client with ``reason`` (a client failed; the others must not wait for it)."""
        with self._cond:
            self.cancelled = reason
            self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool], what: str, limit: bool = True) -> None:
        """Wait (holding ``_cond``) until ``ready()``; raise on the time limit (unless ``limit`` is off) or a cancellation."""
        done = self._cond.wait_for(lambda: ready() or self.cancelled is not None, timeout=self.wait_s if limit else None)
        if self.cancelled is not None and not ready():
            raise WaitTimeout(f"{what}: the run was called off ({self.cancelled})")
        if not done:
            raise WaitTimeout(f"{what}: waited {self.wait_s:g} s")


class Turnstile(_Waits):
    def __init__(self, order: list[tuple[int, int]], wait_s: float):
        super().__init__(wait_s)
        self.order = order
        self._index = {turn: i for i, turn in enumerate(order)}
        self.position = 0

    def current(self) -> tuple[int, int] | None:
        return self.order[self.position] if self.position < len(self.order) else None

    def enter(self, client: int, step: int, give_up: Callable[[int], None] | None = None) -> None:
        """Block until it is ``client``'s turn for ``step``; with ``give_up``, a client whose turn lasts longer
        than the time limit is given up (``give_up(that client)``) and its turns are skipped."""
        turn = (client, step)
        if turn not in self._index:
            raise ValueError(f"client {client} has no turn at step {step} in this schedule")
        with self._cond:
            while True:
                if self._index[turn] < self.position:
                    raise ValueError(f"client {client}'s turn for step {step} is over")
                now = self.current()
                try:
                    self._wait(lambda: self.current() == turn,
                               f"client {client}'s turn at step {step} (the server serves client {now[0]} at step {now[1]})")
                    return
                except WaitTimeout:
                    if give_up is None or self.cancelled is not None:
                        raise
                    if self.current() != now:  # the turns moved on (slowly, or another waiter gave up on it): wait anew
                        continue
                    give_up(now[0])
                    self.skip(now[0])

    def skip(self, client: int) -> None:
        """Drop every remaining turn of ``client`` (it left the run)."""
        with self._cond:
            current = self.order[self.position :]
            self.order = self.order[: self.position] + [t for t in current if t[0] != client]
            self._index = {turn: i for i, turn in enumerate(self.order)}
            self._cond.notify_all()

    def advance(self, client: int, step: int) -> None:
        with self._cond:
            if self.current() != (client, step):
                raise ValueError(f"client {client} ended a turn at step {step} that was not its turn")
            self.position += 1
            self._cond.notify_all()


@dataclass
class _Round:
    items: dict[int, Any] = field(default_factory=dict)
    results: dict[int, Any] | None = None
    error: BaseException | None = None
    computing: bool = False
    taken: int = 0
    holders: dict[int, object] = field(default_factory=dict)  # client -> the call whose item is in ``items``


class Rendezvous(_Waits):
    def __init__(self, wait_s: float):
        super().__init__(wait_s)
        self._rounds: dict[Hashable, _Round] = {}

    def until(self, ready: Callable[[], bool], what: str) -> None:
        """Wait until ``ready()``, which a meeting's result makes true (a sampled client waits for the average it missed)."""
        with self._cond:
            self._wait(ready, what)

    def meet(self, key: Hashable, client: int, item: Any, expected: set[int], compute: Callable[[dict[int, Any]], dict[int, Any]],
             give_up: Callable[[set[int]], None] | None = None, replace: bool = False) -> Any:
        """Leave ``item`` at ``key``; when every ``expected`` client has, ``compute(items)`` runs once and
        each client receives ``results[client]`` (or the error ``compute`` raised).

        With ``give_up``, a round that waited its time limit proceeds with the clients present:
        ``give_up(missing)`` is told who never came (the server drops them from the run). With ``replace``, an item
        the client left before (a process that died waiting) is replaced, and that earlier call ends with an error.
        """
        mine = object()
        with self._cond:
            rnd = self._rounds.setdefault(key, _Round())
            if client in rnd.items:
                if not replace or rnd.computing:
                    raise ValueError(f"client {client} already sent its part for {key}")
                self._cond.notify_all()  # the call whose item this replaces stops waiting
            rnd.items[client], rnd.holders[client] = item, mine
            last = set(rnd.items) >= expected and not rnd.computing
            if last:
                rnd.computing = True
            else:
                replaced = lambda: rnd.holders.get(client) is not mine  # noqa: E731
                try:
                    self._wait(lambda: rnd.results is not None or rnd.error is not None or replaced(),
                               f"{key} still lacks clients {sorted(expected - set(rnd.items))}")
                    if replaced() and rnd.results is None and rnd.error is None:
                        raise WaitTimeout(f"{key}: client {client} said it again from another session, which took this one's place")
                except WaitTimeout:
                    if replaced():
                        raise
                    if rnd.computing and self.cancelled is None:  # another waiter gave up on the missing and computes with our part
                        self._wait(lambda: rnd.results is not None or rnd.error is not None, f"{key}'s result", limit=False)
                    elif give_up is None or self.cancelled is not None:
                        del rnd.items[client]
                        if not rnd.items:
                            self._rounds.pop(key, None)
                        raise
                    else:
                        give_up(expected - set(rnd.items))  # proceed without them
                        rnd.computing = last = True
        if last:
            try:
                results = compute(dict(sorted(rnd.items.items())))
                error = None
            except BaseException as err:  # every waiting client must hear about it
                results, error = None, err
            with self._cond:
                rnd.results, rnd.error = results, error
                self._cond.notify_all()
        with self._cond:
            rnd.taken += 1
            if rnd.taken == len(rnd.items):
                self._rounds.pop(key, None)
        if rnd.error is not None:
            raise rnd.error
        return rnd.results[client]
