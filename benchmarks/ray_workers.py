"""Rounds per second against Ray client workers: 100 clients of a tiny model, 10 sampled a round (issue 27's scale
figure, docs/benchmarks.md).

Each setting trains twice, for SHORT and LONG rounds, and the rate is (LONG - SHORT) / (wall_LONG - wall_SHORT): the
cluster's, actors' and evaluations' fixed costs cancel. Settings are interleaved (1, 2, 1, 2 workers …) on one local
cluster; run it on a quiet machine: ``python benchmarks/ray_workers.py [REPS]``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from splittune.config import load_config
from splittune.engines.ray import start
from splittune.run import train

SHORT, LONG = 2, 26
WORDS = "the quick brown fox jumps over a lazy dog while seven owners keep their text at home".split()


def config(data: Path, workers: int, steps: int):
    return load_config(None, [
        "model=tiny:llama", "train.seq_len=32", "train.batch_size=2", "train.eval_batches=1", "cuts=[1,3]",
        f"data.source={data}", "data.max_documents=200", "clients=100", "clients_per_round=10", "schedule=sfl-v2",
        f"train.steps={steps}", "train.warmup_steps=0", "engine=ray", f"ray.client_workers={workers}",
        f"ray.client_resources={{num_cpus: {1 / workers:g}}}"])


def main(reps: int = 2) -> None:
    start(None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "owners.jsonl"
        data.write_text("".join(json.dumps({"text": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(30))}) + "\n"
                                for i in range(200)))
        rates: dict[int, list[float]] = {1: [], 2: []}
        for rep in range(reps):
            for workers in (1, 2) if rep % 2 == 0 else (2, 1):
                wall = {}
                for steps in (SHORT, LONG):
                    t0 = time.perf_counter()
                    train(config(data, workers, steps), root / f"w{workers}-s{steps}-r{rep}")
                    wall[steps] = time.perf_counter() - t0
                rates[workers].append((LONG - SHORT) / (wall[LONG] - wall[SHORT]))
                print(f"rep {rep}: {workers} worker(s): {rates[workers][-1]:.2f} rounds/s", flush=True)
    for workers, values in rates.items():
        print(f"{workers} worker(s): median {statistics.median(values):.2f} rounds/s "
              f"(min {min(values):.2f}, max {max(values):.2f}, {len(values)} reps)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
