"""Timing entries side by side: every entry's parties are built once, then one round of each entry runs
in turn (A, B, C, B, C, A, …: each round starts one entry later, so none always runs first), so a noisy
neighbour slows every entry alike.

A round is what the training loop calls a round: one step of every client (and the average, when the schedule
averages after it). Each entry reads the same batches in the same order (same seed, same data), so round
``k`` of every entry trains on the same examples and the per-round ratio against centralized pairs like
with like. The thread count is pinned once for the whole process (``torch.set_num_threads``); a server
in its own process gets the same count (``serve --threads``).
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..channels.grpc import GrpcChannel
from ..config import RunConfig
from ..data import merge_tasks
from ..eval import evaluate
from ..models.zoo import ModelSource
from ..run import BREAKDOWN, Fleet, client_tasks, connect, parallel, time_breakdown, train_batch
from ..schedules.policy import policy_for
from .suites import Entry


def spread(values: list[float]) -> dict[str, float]:
    """Median and the 10th-90th percentile range (nearest rank) of ``values``."""
    ordered = sorted(values)
    n = len(ordered)
    return {"median": statistics.median(ordered), "p10": ordered[max(0, (n - 1) // 10)], "p90": ordered[min(n - 1, (n * 9) // 10)]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, threads: int, extra: tuple[str, ...] = ()) -> tuple[str, subprocess.Popen]:
    """``splittune serve`` in its own process on a free loopback port; its URL once it answers health checks.

    Its log (a line per message) goes to a temporary file, not a pipe: nobody reads a pipe while the bench runs,
    and a full one blocks the server on its next log line (split generation fills one within a few hundred tokens)."""
    from ..deploy.service import health

    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "splittune.cli", "serve", "--model", model, "--listen", f"127.0.0.1:{port}",
                             "--threads", str(threads), *extra], stdout=subprocess.DEVNULL, stderr=log)
    url = f"grpc://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the bench's server process ended at start: {log.read().decode(errors='replace')[-400:]}")
        try:
            health(url, timeout_s=1)
            log.close()  # the child keeps its own descriptor
            return url, proc
        except Exception:
            time.sleep(0.2)
    proc.kill()
    log.close()
    raise RuntimeError("the bench's server process did not answer within 300 s")


@dataclass
class Timed:
    """One entry while it is timed: its parties, data and position, and what its rounds measured."""

    entry: Entry
    cfg: RunConfig
    fleet: Fleet
    tasks: list
    server: subprocess.Popen | None = None
    samplers: list = field(default_factory=list)
    schedule: Any = None  # the policy's rounds, consumed one per ``round()``
    rounds: list[dict] = field(default_factory=list)

    @classmethod
    def build(cls, entry: Entry, cfg: RunConfig, source: ModelSource, threads: int, channel_for=None) -> "Timed":
        """``channel_for(i)``: client ``i``'s channel to a server built elsewhere (else one is built for the entry)."""
        tasks = client_tasks(cfg, source.tokenizer())
        samples = [len(t.train) for t in tasks]
        server = None
        if channel_for is not None:
            fleet = connect(cfg, source, samples, list(range(len(samples))), channel_for)
        elif entry.grpc:
            url, server = start_server(cfg.model, threads)
            fleet = connect(cfg, source, samples, list(range(len(samples))), lambda i: GrpcChannel(url))
        else:
            fleet = connect(cfg, source, samples)
        samplers = [iter(t.sampler(cfg.train.batch_size, cfg.seed)) for t in tasks]
        policy = policy_for(cfg.mode, cfg.schedule)
        rounds = iter(policy.rounds(policy.roster(len(tasks), None, cfg.seed), cfg.train.steps, cfg.aggregate_every))
        return cls(entry, cfg, fleet, tasks, server, samplers, rounds)

    def round(self) -> dict[str, Any]:
        """The next round: every client's step at once, then the average if one follows."""
        rnd = next(self.schedule)
        t = self.cfg.train
        jobs = []
        for c, steps in rnd.turns:
            task = self.tasks[c]
            jobs.append((c, steps[0], [train_batch(task, next(self.samplers[c])) for _ in range(t.grad_accum)]))
        t0 = time.perf_counter()
        reports = parallel(lambda job: self.fleet.clients[job[0]].train_step(job[1], job[2]), jobs, self.fleet.abort)
        synced = []
        if rnd.sync == "aggregate":

            def average(c):
                with self.fleet.clients[c].traffic() as sent:
                    self.fleet.clients[c].aggregate(jobs[0][1])
                return sent

            synced = parallel(average, [c for c, _ in rnd.turns], self.fleet.abort)
        round_s = time.perf_counter() - t0
        n = len(self.tasks)
        tokens = sum(int(b["attention_mask"].sum()) for _, _, batches in jobs for b in batches)  # every real token, padding not
        row = {"round_s": round_s, "tokens": tokens, "loss_tokens": sum(r.tokens for r in reports), "loss": sum(r.loss for r in reports) / n,
               "bytes_up": (sum(r.bytes_up for r in reports) + sum(s.up for s in synced)) / n,  # per client step, averages included
               "bytes_down": (sum(r.bytes_down for r in reports) + sum(s.down for s in synced)) / n}
        first = reports[0]
        if first.link is not None:
            row["breakdown"] = {k: v for k, v in time_breakdown(first.step_s, first.link).items() if k in BREAKDOWN}
        self.rounds.append(row)
        return row

    def evaluate(self) -> dict[str, float]:
        """The trained model (client 0's: the average after the last round) on the held-out data of every client."""
        pooled = merge_tasks(self.tasks) if len(self.tasks) > 1 else self.tasks[0]
        result = evaluate(self.fleet.clients[0], pooled, self.cfg.train.batch_size, self.cfg.train.eval_batches)
        return {k: v for k, v in result.items() if k in ("loss", "ppl", "accuracy")}

    def close(self) -> None:
        self.fleet.close()
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()


def summarise(timed: Timed, warmup: int, reference: "Timed | None", peft: Any = None) -> dict[str, Any]:
    """An entry's figures over its measured rounds (after ``warmup``), with per-round ratios against ``reference``
    (our centralized mode) and ``peft`` (a plain transformers + peft loop), as time per training token, so rounds of
    several clients compare with one client's step."""
    rows = timed.rounds[warmup:]
    out: dict[str, Any] = {
        "rounds": len(rows),
        "step_s": {**spread([r["round_s"] for r in rows]), "all": [round(r["round_s"], 6) for r in rows]},
        "tokens_per_step": statistics.median(r["tokens"] for r in rows),
        "tokens_per_s": statistics.median(r["tokens"] / r["round_s"] for r in rows),
        "bytes_up": statistics.median(r["bytes_up"] for r in rows),
        "bytes_down": statistics.median(r["bytes_down"] for r in rows),
        "bytes_up_last": rows[-1]["bytes_up"],  # an activation cache shows here: its later epochs send almost nothing
        "train_loss_last": timed.rounds[-1]["loss"],
    }
    if rows and "breakdown" in rows[0]:
        out["breakdown"] = {k: statistics.median(r["breakdown"][k] for r in rows) for k in rows[0]["breakdown"]}
    for key, base in (("ratio_vs_centralized", reference), ("ratio_vs_peft", peft)):
        if base is not None:
            ratios = [(r["round_s"] / r["tokens"]) / (c["round_s"] / c["tokens"]) for r, c in zip(rows, base.rounds[warmup:])]
            out[key] = spread(ratios)
    return out


def pin_threads(threads: int) -> int:
    torch.set_num_threads(threads)
    return torch.get_num_threads()
