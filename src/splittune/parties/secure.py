"""Secure aggregation on the wire (``secure_aggregation: true``): the four rounds of Bonawitz et al.
(``dpmath/secagg.py`` holds the protocol math) as messages between each client and the server.

A client's adapters reach the server only masked; the server, which also runs the averaging, learns their
weighted sum over the clients whose masked input arrived, and divides by the sum of the weights (the clients'
sample counts, sent in the clear as before). Per average at ``step``:

1. ``secagg_keys``: each client's two public keys (fresh every round) -> the roster;
2. ``secagg_shares``: each client's encrypted key shares for every peer -> each client's inbox;
3. ``aggregate`` with ``commit``: the masked ring words of the client's tensors -> who survived and who dropped;
4. ``secagg_unmask``: each survivor's shares for the survivors' self-masks and the dropped clients' keys -> the
   average, as an ordinary ``aggregate`` reply would carry it.

Each round is a rendezvous of the run's active clients; a client that vanishes is given up as in any average,
and the sum is still exact over the survivors as long as ``threshold`` of them answer the last round. Fewer
survivors than ``hiding_floor`` would hide nothing from each other (of two, each reads the other's update from
the sum), so such a round is called off and every survivor is told why, rather than going on quietly.
Secure aggregation needs one layout for every client (the same cuts and LoRA rank): the sum of masked vectors is
defined only for vectors of one shape, and exact rank-heterogeneous averaging needs every client's factors.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..dpmath.secagg import SecAggAggregator, SecAggClient, SecAggError, default_threshold
from ..wire import Message
from .protocol import ProtocolError

KINDS = ("secagg_keys", "secagg_shares", "secagg_unmask")


def as_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.to(torch.uint8).contiguous().view(-1).numpy())


def as_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def by_index(tensors: dict[str, torch.Tensor], prefix: str) -> dict[int, bytes]:
    """``{prefix}{i}`` tensors -> {i: bytes}; a name that is not ``prefix`` and a client index is refused."""
    out = {}
    for name, t in tensors.items():
        index = name.removeprefix(prefix)
        if not name.startswith(prefix) or not index.isdigit() or t.dtype != torch.uint8 or t.dim() != 1:
            raise SecAggError(f"secure aggregation: tensor {name!r} ({t.dtype}, {tuple(t.shape)}) is not a {prefix}<client> "
                              "byte string")
        out[int(index)] = as_bytes(t)
    return out


def client_round(call: Callable[..., Message], index: int, clients: int, step: int, tensors: dict[str, torch.Tensor],
                 weight: float) -> Message:
    """The client's side of one secure average: ``call(kind, step, micro, tensors, **meta)`` is its request to the
    server; returns the last reply (the average's share, as a plain ``aggregate`` reply)."""
    client = SecAggClient(index, default_threshold(clients))
    roster = by_index(call("secagg_keys", step, 0, {"advert": as_tensor(client.advertise(step))}).tensors, "pk.")
    outgoing = client.share_keys(roster)
    inbox = by_index(call("secagg_shares", step, 0, {f"ct.{j}": as_tensor(ct) for j, ct in outgoing.items()}).tensors, "ct.")
    masked = client.mask({k: v.detach().cpu() for k, v in tensors.items()}, weight, inbox)
    reply = call("aggregate", step, 0, dict(masked["words"]), weight=masked["weight"], commit=masked["commit"].hex())
    answer = client.unmask(reply.meta["survivors"], reply.meta["dropped"])
    shares = {**{f"b.{j}": as_tensor(s) for j, s in answer["b"].items()}, **{f"s.{d}": as_tensor(s) for d, s in answer["s"].items()}}
    return call("secagg_unmask", step, 0, shares)


def hiding_floor(clients: int) -> int:
    """The fewest survivors whose sum still hides each update: the protocol's threshold, and at least three (two
    survivors each subtract their own update from the sum and read the other's), unless the run has fewer."""
    return min(clients, max(3, default_threshold(clients)))


class SecureRounds:
    """The server's side: one ``SecAggAggregator`` per average (keyed by step), driven by the group's rendezvous."""

    def __init__(self, clients: int):
        self.clients = clients
        self.threshold = default_threshold(clients)
        self.floor = hiding_floor(clients)
        self.rounds: dict[int, SecAggAggregator] = {}
        self.weights: dict[int, dict[int, float]] = {}  # step -> each survivor's (public) weight

    def check_survivors(self, step: int, present) -> None:
        """Call the round off (every survivor hears it) when too few clients remain to hide each update."""
        present = sorted(present)
        if len(present) >= self.floor:
            return
        gone = sorted(set(range(self.clients)) - set(present))
        self.rounds.pop(step, None)
        raise ProtocolError(
            f"secure aggregation at step {step} is called off: client{'s' * (len(gone) > 1)} {', '.join(map(str, gone))} dropped "
            f"out, leaving {len(present)} ({', '.join(map(str, present))}), fewer than the {self.floor} whose sum keeps each "
            "update hidden (with two, each reads the other's from the average); rerun every client's same command to "
            "resume the run from its last checkpoint", "ABORTED")

    def keys(self, step: int, adverts: dict[int, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
        self.check_survivors(step, adverts)
        aggregator = self.rounds[step] = SecAggAggregator(self.threshold)
        for old in [s for s in self.rounds if s < step]:  # a round that never finished (a failed average)
            del self.rounds[old]
        roster = aggregator.start_round(step, {i: as_bytes(t) for i, t in adverts.items()})
        reply = {f"pk.{i}": as_tensor(pk) for i, pk in roster.items()}
        return {i: reply for i in adverts}

    def shares(self, step: int, outgoing: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
        self.check_survivors(step, outgoing)
        inbox = self._round(step).route_shares({i: by_index(t, "ct.") for i, t in outgoing.items()})
        return {i: {f"ct.{j}": as_tensor(ct) for j, ct in inbox.get(i, {}).items()} for i in outgoing}

    def masked(self, step: int, inputs: dict[int, tuple[dict[str, torch.Tensor], float, str]]) -> dict[int, dict]:
        self.check_survivors(step, inputs)
        masked = {}
        for i, (words, weight, commit) in inputs.items():
            try:
                masked[i] = {"weight": weight, "commit": bytes.fromhex(commit), "words": words}
            except ValueError:
                raise SecAggError(f"secure aggregation: client {i}'s commit is not hex") from None
        survivors, dropped = self._round(step).collect_masked(masked)
        self.weights[step] = {i: masked[i]["weight"] for i in survivors}
        return {i: {"survivors": list(survivors), "dropped": list(dropped)} for i in inputs}

    def finish(self, step: int, answers: dict[int, dict[str, torch.Tensor]]):
        """The round's sum over the survivors (``dpmath.secagg.Aggregate``: ``tensors`` Σ w·x, ``weight`` Σ w) and
        each survivor's weight."""
        self.check_survivors(step, answers)
        parsed = {}
        for i, tensors in answers.items():
            parsed[i] = {"b": by_index({k: v for k, v in tensors.items() if k.startswith("b.")}, "b."),
                         "s": by_index({k: v for k, v in tensors.items() if k.startswith("s.")}, "s.")}
            if set(tensors) - {f"b.{j}" for j in parsed[i]["b"]} - {f"s.{d}" for d in parsed[i]["s"]}:
                raise SecAggError(f"secure aggregation: client {i} sent tensors other than b.<client> and s.<client> shares")
        total = self.rounds.pop(step).finish(parsed)
        return total, self.weights.pop(step)

    def _round(self, step: int) -> SecAggAggregator:
        aggregator = self.rounds.get(step)
        if aggregator is None:
            raise SecAggError(f"secure aggregation: no round is open at step {step} (send secagg_keys first)")
        return aggregator
