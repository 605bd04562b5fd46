"""The cut pipeline on the builtin model: step-time ratios measured side by side, bytes per step, and what an
emulated slow link costs with and without int8 and pipelining.

    .venv/bin/python benchmarks/cut.py [--model builtin:smollm2-135m] [--reps 6] [--threads 2]

Every entry is built once (its own parties, same seed, same batch); then one step of each entry runs in
turn, ``--reps`` times (A, B, C, A, B, C, …), so a noisy neighbour slows all entries alike. The thread
count is pinned for every entry (``torch.set_num_threads``). Reported: the median step time, its 10th-90th
percentile spread, the ratio of medians against centralized, and bytes per step each way. (The full
harness with reports and plots is ``splittune bench``, a later issue; this script backs docs/efficiency.md.)
``--grpc`` adds the split with ``splittune serve`` in its own process on loopback, one server per entry.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from splittune.bench.measure import start_server
from splittune.channels.grpc import GrpcChannel
from splittune.config import load_config
from splittune.run import build, client_tasks, connect

ENTRIES = {
    "centralized": ["mode=centralized"],
    "split": [],
    "split, 4 micro-batches": ["train.micro_batches=4"],
    "10 Mbps 20 ms, raw": ["link.bandwidth_mbps=10", "link.latency_ms=20"],
    "10 Mbps 20 ms, int8": ["link.bandwidth_mbps=10", "link.latency_ms=20", "codec.up=int8", "codec.down=int8"],
    "10 Mbps 20 ms, int8, 4 micro-batches": ["link.bandwidth_mbps=10", "link.latency_ms=20", "codec.up=int8", "codec.down=int8",
                                             "train.micro_batches=4"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--cuts", default="[2,28]")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grpc", action="store_true", help="also the split over gRPC with `splittune serve` in its own process")
    ap.add_argument("--only", nargs="*", help="entries to run (centralized always runs: ratios are against it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = [f"model={args.model}", f"cuts={args.cuts}", "train.batch_size=4", "train.seq_len=128", "train.warmup_steps=0",
            "train.steps=1000"]
    parties, batch = {}, None
    chosen = {n: e for n, e in ENTRIES.items() if not args.only or n in args.only or n == "centralized"}
    for name, sets in chosen.items():
        cfg = load_config(None, [*base, *sets])
        client, _, link, source = build(cfg)
        if batch is None:
            task = client_tasks(cfg, source.tokenizer())[0]
            batch = task.collate(task.train[:4])
        parties[name] = (client, link)
    servers = []
    if args.grpc:  # the same split with the server in its own process, over gRPC on loopback
        for name, sets in (("gRPC loopback", []), ("gRPC loopback, 4 micro-batches", ["train.micro_batches=4"])):
            url, proc = start_server(args.model, args.threads)
            servers.append(proc)
            cfg = load_config(None, [*base, *sets]).resolve(30)
            fleet = connect(cfg, source, [1], [0], lambda i, url=url: GrpcChannel(url))
            parties[name] = (fleet.clients[0], fleet.links[0])
    times = {name: [] for name in parties}
    sent = {}
    for rep in range(args.reps + 1):  # the first round warms up
        for name, (client, link) in parties.items():
            up0, down0 = (link.bytes_up, link.bytes_down) if link else (0, 0)
            t0 = time.perf_counter()
            client.train_step(rep + 1, [batch])
            dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
            sent[name] = ((link.bytes_up - up0, link.bytes_down - down0) if link else (0, 0))
    ref = statistics.median(times["centralized"])
    print(f"{args.model} cuts {args.cuts}, batch 4x128, fp32, {args.threads} threads, {args.reps} interleaved reps")
    print(f"{'entry':<40} {'median s':>9} {'p10-p90 s':>15} {'/ centralized':>14} {'bytes up':>11} {'bytes down':>11}")
    for name, ts in times.items():
        ts = sorted(ts)
        lo, hi = ts[max(0, len(ts) // 10)], ts[min(len(ts) - 1, len(ts) * 9 // 10)]
        med = statistics.median(ts)
        print(f"{name:<40} {med:9.3f} {lo:7.3f}-{hi:<7.3f} {med / ref:14.3f} {sent[name][0]:11,d} {sent[name][1]:11,d}")
    for proc in servers:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
