"""Several independent runs against one server (``serve --max-runs``), timed as one entry: their steps at once or
one run's after the other's, every run on the same ``Host`` (one frozen base), in this process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig
from ..engines.local import in_process, server_for
from ..models.zoo import ModelSource
from ..parties.server.host import Host
from ..run.assemble import parallel
from .measure import Timed
from .suites import Entry


@dataclass
class TimedRuns:
    """``entry.runs`` one-run ``Timed``s sharing a ``Host``; a round is one round of each (what a bench round times)."""

    entry: Entry
    cfg: RunConfig
    host: Host
    runs: list[Timed]
    rounds: list[dict] = field(default_factory=list)

    @classmethod
    def build(cls, entry: Entry, cfg: RunConfig, source: ModelSource, threads: int) -> "TimedRuns":
        host = Host(lambda bank: server_for(source, bank=bank), max_runs=entry.runs)
        channel = in_process(host)
        runs: list[Timed] = []
        try:
            for k in range(entry.runs):  # the runs differ by seed: their own adapters, data order and noise
                runs.append(Timed.build(entry, cfg.model_copy(update={"seed": cfg.seed + k}), source, threads,
                                        lambda i: channel()))
        except BaseException:
            for t in runs:
                t.close()
            host.close()
            raise
        return cls(entry, cfg, host, runs)

    def round(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        rows = parallel(lambda t: t.round(), self.runs) if self.entry.together else [t.round() for t in self.runs]
        row = {"round_s": time.perf_counter() - t0, "tokens": sum(r["tokens"] for r in rows),
               "loss_tokens": sum(r["loss_tokens"] for r in rows), "loss": sum(r["loss"] for r in rows) / len(rows),
               "bytes_up": sum(r["bytes_up"] for r in rows) / len(rows), "bytes_down": sum(r["bytes_down"] for r in rows) / len(rows)}
        self.rounds.append(row)
        return row

    def evaluate(self) -> dict[str, float]:
        return self.runs[0].evaluate()

    def close(self) -> None:
        for t in self.runs:
            t.close()
        self.host.close()
