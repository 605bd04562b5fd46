"""Schedule policies: how clients take turns with the server, written once and read by the training loop and the server.

A policy answers every question a schedule raises: in which order the server serves (client, step)
turns, when a client's turn ends, how many optimizer steps each party's LR schedule spans, whether the
server batches the clients' rows through one base (sfl-v1), whether adapters are averaged or relayed,
and in which rounds the loop drives its clients. Nothing else in the code compares schedule names.

The server party cannot import this layer (imports point down: ``schedules`` → ``parties``), so the
run's assembly and ``splittune serve`` hand it :data:`POLICIES`; the server looks a session's policy up by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sampling import Roster


@dataclass(frozen=True)
class Round:
    """One unit of the training loop: ``turns`` are (client, steps) run in order (a sequential relay) or at
    once (every other schedule: each client runs its step concurrently); ``sync`` follows the round."""

    turns: list[tuple[int, list[int]]]
    concurrent: bool
    sync: str | None  # "aggregate", "relay" (each turn hands its model on) or None


class SchedulePolicy:
    name = ""
    server_part = True  # the server runs segments (federated: it only averages)
    shared_server_adapter = True  # one server-side adapter all clients' steps update (else one per client)
    relays = False  # one client-side model is handed from client to client
    ordered_turns = False  # the server serves training messages in a fixed (client, step) order

    def batched(self, clients: int) -> bool:
        """Whether the server runs the clients' rows of a micro-batch together through one base."""
        return False

    def roster(self, clients: int, per_round: int | None, seed: int) -> Roster:
        """Which clients each round trains (the server, which cannot import this layer, asks its policy)."""
        return Roster(clients, per_round, seed)

    def turn_order(self, roster: Roster, steps: int, every: int) -> list[tuple[int, int]]:
        """(client, step) turns in the order the server serves them; empty when clients train in parallel."""
        return []

    def turn_ends(self, step: int, steps: int, every: int) -> bool:
        """Whether ``step`` ends a client's turn with a hand-on (the relay), not with its step message."""
        return False

    def client_steps(self, steps: int, clients: int) -> int:
        """Optimizer steps a client-side LR schedule spans."""
        return steps

    def server_steps(self, steps: int, clients: int) -> int:
        """Optimizer steps a server-side adapter's LR schedule spans (``clients``: those each step trains)."""
        return steps * clients if self.shared_server_adapter else steps

    def own_schedules(self) -> bool:
        """Whether each client (and an sfl-v1 server adapter per client) keeps an LR schedule of its own, indexed by the
        run's step: a client a round did not sample catches its schedule up to the step it trains next."""
        return not self.relays

    def averages(self, clients: int) -> bool:
        """Whether clients' adapters are averaged (stage 7) in this run."""
        return clients > 1

    def rounds(self, roster: Roster, steps: int, every: int, start: int = 0) -> list[Round]:
        """The loop's rounds after the completed step ``start`` (a resumed run skips what it did): one per step, each
        of the clients sampled for its round (``Roster``), averaged at the end of the round."""
        sync = "aggregate" if self.averages(roster.clients) else None
        return [Round([(c, [t]) for c in roster.at(t, every)], True, sync if t % every == 0 or t == steps else None)
                for t in range(start + 1, steps + 1)]


class Centralized(SchedulePolicy):
    name = "centralized"
    server_part = False


class Federated(SchedulePolicy):
    name = "federated"
    server_part = False


class SflV1(SchedulePolicy):
    """Every client in parallel; one frozen server base with one adapter per client, rows batched together."""

    name = "sfl-v1"
    shared_server_adapter = False

    def batched(self, clients: int) -> bool:
        return clients > 1


class SflV2(SchedulePolicy):
    """Every client in parallel; one shared server-side adapter, updated by one client's step at a time."""

    name = "sfl-v2"
    ordered_turns = True

    def turn_order(self, roster, steps, every):
        return [] if roster.clients == 1 else [(c, t) for t in range(1, steps + 1) for c in roster.at(t, every)]


class Sequential(SchedulePolicy):
    """Vanilla split learning: one client at a time for ``every`` steps, then it relays its model to the next."""

    name = "sequential"
    relays = True
    ordered_turns = True

    def _spans(self, steps: int, every: int) -> list[range]:
        return [range(s, min(s + every, steps + 1)) for s in range(1, steps + 1, every)]

    def turn_order(self, roster, steps, every):
        if roster.clients == 1:
            return []
        return [(c, t) for span in self._spans(steps, every) for c in roster.at(span[0], every) for t in span]

    def turn_ends(self, step, steps, every):
        return step % every == 0 or step == steps

    def client_steps(self, steps, clients):
        return steps * clients  # one LR schedule handed through every client

    def averages(self, clients):
        return False

    def rounds(self, roster, steps, every, start=0):
        if roster.clients == 1:
            return super().rounds(roster, steps, every, start)
        return [Round([(c, list(span)) for c in roster.at(span[0], every)], False, "relay")
                for span in self._spans(steps, every) if span[-1] > start]


POLICIES: dict[str, SchedulePolicy] = {p.name: p for p in (Centralized(), Federated(), SflV1(), SflV2(), Sequential())}


def policy_for(mode: str, schedule: str) -> SchedulePolicy:
    """The policy of a run: its schedule in ``mode: split``, else the mode itself (centralized, federated)."""
    return POLICIES[schedule if mode == "split" else mode]
