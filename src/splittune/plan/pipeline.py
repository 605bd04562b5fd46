"""One step's timeline, as the client drives it (``parties/client/pipeline.py``: ``_pipeline``): micro-batch forwards
go out in index order; when ``max_in_flight`` are out, the oldest takes its next stage; then every
remaining stage in index order; then the ``step`` round trip. The server is one engine that takes jobs in
arrival order; each direction of the link is a queue (``channels/emulated.py``'s ``LinkModel``: a frame
arrives after the frames before it, its bytes over the rate, and the latency). Each party computes on its
own machine, so the client's and the server's work overlap wherever the order allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..channels.emulated import LinkModel


@dataclass(frozen=True)
class Hop:
    """One round trip: the client's work before it, the bytes each way, the server's job, and the client's
    work once the reply is in (before its next send)."""

    before_s: float
    up: int
    server_s: float
    down: int
    after_s: float = 0.0


def simulate(micros: list[list[Hop]], step: Hop, max_in_flight: int, link: LinkModel | None) -> float:
    """Seconds from the step's first forward to its optimizer step's end. ``micros[i]`` are micro-batch
    ``i``'s round trips in order (one in a two-part split, two in a U-shape); a hop's ``after_s`` runs
    when its reply is taken, before the next hop's ``before_s``."""
    now = 0.0
    server_free = 0.0

    def send(hop: Hop) -> float:
        nonlocal server_free
        arrive = link.deliver("up", now, hop.up) if link else now
        server_free = max(arrive, server_free) + hop.server_s
        return link.deliver("down", server_free, hop.down) if link else server_free

    stage = [0] * len(micros)  # hops done
    reply = [0.0] * len(micros)

    def advance(i: int) -> None:
        nonlocal now
        hops = micros[i]
        now = max(now, reply[i]) + hops[stage[i]].after_s
        stage[i] += 1
        if stage[i] < len(hops):
            now += hops[stage[i]].before_s
            reply[i] = send(hops[stage[i]])

    for i, hops in enumerate(micros):
        while sum(1 for j in range(i) if stage[j] < len(micros[j])) >= max_in_flight:
            advance(next(j for j in range(i) if stage[j] < len(micros[j])))
        now += hops[0].before_s
        reply[i] = send(hops[0])
    for depth in range(max(len(h) for h in micros)):
        for i in range(len(micros)):
            if stage[i] == depth and stage[i] < len(micros[i]):
                advance(i)
    now += step.before_s
    done = send(step)
    return max(now, done) + step.after_s
