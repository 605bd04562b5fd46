"""Client workers on Ray (``engine: ray`` with ``ray.client_workers: K``): the run's clients spread over K actors, as
the client processes of a deployed run are spread over machines.

Each worker is one client process of the run (``train_remote`` with several client indices: client i on worker
i mod K): its clients share one copy of the frozen weights (``models/sharing.py``), keep their adapters, optimizers
and chains in its memory, and reach the trunk's actor over Ray channels, which carry the frames a deployment's
channels carry. The server orders every client's turns and averages as it does for clients in one process, so the
run trains as the in-process run does; memory grows with the workers, not with the clients.

A worker writes what a client process writes into ``RUN_DIR/workers/w<k>`` (its clients' steps, checkpoints and
evaluations on its clients' held-out data); the driver gathers them: every client's steps in ``metrics.jsonl``, the
evaluations and adapters of the worker that holds client 0, and one summary with each worker's.

Faults: a worker that dies (its process killed, its node lost) is restarted by Ray, on another node when its own is
gone, and reruns its clients from their last checkpoint. Its hello rejoins the run, the server takes every client
back to that step (deployment's rejoin), and the run ends where an undisturbed run ends. On a cluster of several
nodes, RUN_DIR must be on a filesystem every node sees.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig
from ..errors import SplittuneError
from ..report.plots import plot_loss
from ..schedules.policy import policy_for
from ..models.zoo import resolve_model
from .adapters import ADAPTERS
from .assemble import set_seed
from .loop import resolved
from .resume import CHECKPOINTS, owns_run_dir, prepare_run_dir, with_defense_seed

WORKERS = "workers"
RESTARTS = 3  # how often Ray restarts a dead worker (and reruns its clients) before the run fails


class _ClientWorker:
    """One client process of the run, in a Ray actor; ``run`` returns its summary as JSON (nothing of ours pickled)."""

    def run(self, config: str, out: str, indices: list[int], trunk) -> str:
        from ..channels.ray import RayChannel
        from .remote import train_remote

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pid").write_text(str(os.getpid()))  # (the fault test kills this process)
        summary = train_remote(RunConfig.model_validate_json(config), folder, indices, lambda i: RayChannel(trunk))
        return json.dumps(summary)


def parts(cfg: RunConfig) -> list[list[int]]:
    """Each worker's clients: client i on worker i mod K."""
    k = cfg.ray.client_workers
    return [list(range(w, cfg.clients, k)) for w in range(k)]


@owns_run_dir(shared=lambda cfg: False)  # the driver only waits: the workers compute
def train_on_workers(cfg: RunConfig, out: Path, progress: Callable | None = None) -> dict[str, Any]:
    """Run ``cfg`` with its clients on Ray worker actors; write the run directory (a worker resumes its clients from
    its own checkpoints: the same command resumes the run)."""
    from ..engines.ray import RayEngineError, RayServer, first_line, ray_module, start

    ray = ray_module()
    started = time.perf_counter()
    set_seed(cfg.seed)
    cfg = with_defense_seed(resolved(cfg, resolve_model(cfg.model)), out)  # one defense seed for every worker
    prepare_run_dir(cfg, out)
    start(cfg.ray.address)
    res = cfg.ray.client_resources
    _check_room(ray, cfg)
    threads = max(1, int(res.num_cpus))  # each worker computes with the CPUs it asked for
    config = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": threads})}).model_dump_json()
    server = RayServer(cfg.model, out / CHECKPOINTS / "server", cfg.train.device, cfg.ray.server_resources.model_dump(),
                       cfg.ray.trunk_spans)
    actor = ray.remote(_ClientWorker).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=RESTARTS,
                                              max_task_retries=RESTARTS)
    workers = []
    try:
        workers = [actor.remote() for _ in parts(cfg)]
        futures = [w.run.remote(config, str(out / WORKERS / f"w{k}"), part, server.actor)
                   for k, (w, part) in enumerate(zip(workers, parts(cfg)))]
        summaries = [json.loads(s) for s in _follow(ray, futures, cfg, out, progress)]
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, SplittuneError):  # the worker's own one-line error (a data problem, a refusal)
            raise cause from None
        raise RayEngineError(f"a client worker failed: {first_line(err)}") from None
    except ray.exceptions.RayActorError as err:
        raise RayEngineError(f"a client worker died {RESTARTS + 1} times; the run stops: {first_line(err)}") from None
    finally:
        for w in workers:
            ray.kill(w)
        server.close()
    return _gather(cfg, out, summaries, started)


def _check_room(ray, cfg: RunConfig) -> None:
    """Refuse at once workers the cluster cannot place (Ray would wait for them forever)."""
    from ..engines.ray import RayEngineError

    k, res, server = cfg.ray.client_workers, cfg.ray.client_resources, cfg.ray.server_resources
    cpus, gpus = k * res.num_cpus + server.num_cpus, k * res.num_gpus + server.num_gpus
    total = ray.cluster_resources()
    if cpus > total.get("CPU", 0) or gpus > total.get("GPU", 0):
        raise RayEngineError(f"ray.client_workers={k} workers of {res.num_cpus:g} CPUs and {res.num_gpus:g} GPUs and the "
                             f"server's actor ({server.num_cpus:g} CPUs, {server.num_gpus:g} GPUs) need {cpus:g} CPUs and "
                             f"{gpus:g} GPUs; the Ray cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} "
                             "GPUs: lower ray.client_resources (fractions are allowed) or add nodes")


def _follow(ray, futures: list, cfg: RunConfig, out: Path, progress: Callable | None) -> list[str]:
    """Wait for the workers, telling ``progress`` of every client step they write."""
    policy = policy_for(cfg.mode, cfg.schedule)
    roster = policy.roster(cfg.clients, cfg.round_size if cfg.samples_clients else None, cfg.seed)
    planned = sum(len(steps) for rnd in policy.rounds(roster, cfg.train.steps, cfg.aggregate_every) for _, steps in rnd.turns)
    pending, seen, tails = list(futures), 0, {}
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        if progress is None:
            continue
        last = None
        for path in sorted((out / WORKERS).glob("w*/metrics.jsonl")):
            last = _tail(path, tails.setdefault(path, [0, 0, None]))[2] or last
        done = sum(t[1] for t in tails.values())
        if done != seen and last is not None:
            seen = done
            progress(min(seen, planned), planned, last)
    return ray.get(futures)


def _tail(path: Path, state: list) -> list:
    """``state`` ([bytes read, rows, last row]) brought up to what ``path`` holds now, reading only what was appended
    (a worker that resumes rewrites its file shorter: then it is read again from the start). For progress only: the
    run's rows are gathered from the finished files."""
    size = path.stat().st_size
    if size < state[0]:
        state[:] = [0, 0, None]
    with open(path, "rb") as f:
        f.seek(state[0])
        chunk = f.read(size - state[0])
    complete = chunk[:chunk.rfind(b"\n") + 1]  # (a row being written waits for the next look)
    lines = [line for line in complete.decode().splitlines() if line.strip()]
    state[0] += len(complete)
    state[1] += len(lines)
    if lines:
        state[2] = json.loads(lines[-1])
    return state


def _rows(out: Path) -> list[dict]:
    """Every worker's client steps so far, in the order the run took them (step, then client)."""
    rows = []
    for path in sorted((out / WORKERS).glob("w*/metrics.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: (r["step"], r["client"]))


def _gather(cfg: RunConfig, out: Path, summaries: list[dict], started: float) -> dict[str, Any]:
    """The run directory of the whole run from its workers' directories."""
    rows = _rows(out)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = out / WORKERS / "w0"  # the worker holding client 0: the global model's evaluations and adapters
    shutil.copyfile(first / "evals.jsonl", out / "evals.jsonl")
    shutil.rmtree(out / ADAPTERS, ignore_errors=True)
    shutil.copytree(first / ADAPTERS, out / ADAPTERS)
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    plot_loss(rows, evals, out / "loss.png", f"{cfg.model} · {cfg.clients} clients on {cfg.ray.client_workers} Ray workers")
    summary = dict(summaries[0])
    summary.update(
        engine="ray", client_workers=cfg.ray.client_workers, wall_s=round(time.perf_counter() - started, 3),
        bytes_up=sum(s["bytes_up"] for s in summaries), bytes_down=sum(s["bytes_down"] for s in summaries),
        per_client=sorted((c for s in summaries for c in s["per_client"]), key=lambda c: c["client"]),
        workers=[{"worker": k, "clients": part, "eval_loss_after": s["eval_loss_after"], "peak_memory": s["peak_memory"]}
                 for k, (part, s) in enumerate(zip(parts(cfg), summaries))],
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
