"""Client sampling: which clients each round trains (``clients_per_round``), as every federated framework samples.

A round is ``aggregate_every`` steps (a relay's turn for ``sequential``). Its clients are drawn without
replacement from a generator seeded by the run's seed and the round's number alone, so the clients, the
server and a resumed run all draw the same clients without telling each other, and rounds are independent
draws (Flower's and FedAvg's uniform sampling). Without sampling the roster is every client, every round.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Roster:
    """The run's ``clients``, ``per_round`` of them sampled each round (None: all) from ``seed``."""

    clients: int
    per_round: int | None = None
    seed: int = 0

    @property
    def size(self) -> int:
        """Clients a round trains."""
        return self.clients if self.per_round is None else min(self.per_round, self.clients)

    @property
    def samples(self) -> bool:
        return self.size < self.clients

    def of(self, round_: int) -> list[int]:
        """The clients round ``round_`` (from 1) trains, in index order."""
        if not self.samples:
            return list(range(self.clients))
        return list(_draw(self.seed, self.clients, self.size, round_))

    def at(self, step: int, every: int) -> list[int]:
        """The clients that train step ``step`` (rounds of ``every`` steps)."""
        return self.of(round_of(step, every))


@functools.lru_cache(maxsize=4096)
def _draw(seed: int, clients: int, size: int, round_: int) -> tuple[int, ...]:
    """One round's draw, computed once: the server asks for it with every training message."""
    return tuple(sorted(random.Random(f"splittune-round:{seed}:{round_}").sample(range(clients), size)))


def round_of(step: int, every: int) -> int:
    """The round (from 1) step ``step`` (from 1) belongs to."""
    return (step - 1) // every + 1
