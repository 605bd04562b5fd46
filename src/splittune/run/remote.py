"""``train_remote``: one client process of a deployed run (``splittune train --server``), and what it says when the
connection to its server breaks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint
from ..channels import Channel
from ..config import ConfigError, RunConfig
from ..data import TaskData, merge_tasks
from ..device import rng_state, set_rng_state
from ..models.zoo import ModelSource, resolve_model
from ..taps.recording import SENT, SentLog
from .assemble import Fleet, client_tasks, connect, set_seed
from .loop import Loop, resolved
from .resume import CHECKPOINTS, owns_run_dir, prepare_run_dir, rejoin_from, run_identity, saved_link_states, with_defense_seed


@owns_run_dir(shared=lambda cfg: False)  # one client process; its server is elsewhere
def train_remote(cfg: RunConfig, out: Path, client_index: int | list[int], channel_for: Callable[[int], Channel],
                 progress: Callable | None = None) -> dict[str, Any]:
    """One client of a deployed run: this process's data and segments, the server over ``channel_for``.

    Everything else is the in-process code path; with the same config the losses, adapters and byte
    counts equal the in-process run's. Evaluations use this process's held-out data. When a restarted peer
    rejoins the run, this client goes back to the step it rejoined at and goes on from there. A list of indices runs
    those clients in this process (a Ray client worker: ``engines/ray_workers.py``).
    """
    from ..channels.base import RemoteError

    indices = [client_index] if isinstance(client_index, int) else sorted(client_index)
    if cfg.mode == "centralized":
        raise ConfigError("mode: centralized trains without a server; drop --server")
    for i in indices:
        if not 0 <= i < cfg.clients:
            raise ConfigError(f"--client-index {i} is outside this run's clients 0..{cfg.clients - 1}")
    started = time.perf_counter()
    set_seed(cfg.seed)
    source = resolve_model(cfg.model)
    cfg = with_defense_seed(resolved(cfg, source), out)
    resume = prepare_run_dir(cfg, out)
    every = client_tasks(cfg, source.tokenizer())
    tasks = [every[i] for i in indices]
    fresh = rng_state()  # a run rolled back to its start begins as this one did
    while True:
        set_rng_state(fresh)  # (a resumed run restores its checkpoint's)
        try:
            return _train_remote(cfg, out, source, tasks, indices, channel_for, progress, started, resume)
        except RemoteError as err:
            if err.rejoin is None:
                raise
            resume = rejoin_from(out, err.rejoin, str(err))


def _train_remote(cfg: RunConfig, out: Path, source: ModelSource, tasks: list[TaskData], indices: list[int],
                  channel_for: Callable[[int], Channel], progress: Callable | None, started: float, resume: int | None):
    from ..channels.base import ConnectionLost, RemoteError

    ledger = SentLog(out / SENT, append=resume is not None)
    loop = fleet = None
    try:
        fleet = connect(cfg, source, [len(task.train) for task in tasks], indices, channel_for, resume=resume,
                        run_id=run_identity(out), link_states=saved_link_states(out, resume), ledger=ledger)
        pooled = merge_tasks(tasks) if len(tasks) > 1 else tasks[0]
        loop = Loop(cfg, fleet, tasks, pooled, out, progress, started, resume)
        return loop.run()
    except RemoteError as err:
        if err.code not in LOST or isinstance(err, ConnectionLost):
            raise
        if fleet is None:
            raise
        raise _connection_lost(err, cfg, out, fleet, loop) from None
    finally:
        if fleet is not None:
            fleet.close()
        ledger.close()


# the statuses of a connection that broke (the server process died, the network went away), not of a refusal
LOST = ("UNAVAILABLE", "CANCELLED", "DATA_LOSS", "UNKNOWN")


def _connection_lost(err, cfg: RunConfig, out: Path, fleet: Fleet, loop: "Loop | None"):
    """What a client whose server vanished says (a ``ConnectionLost``): where it stopped, and where the same
    command resumes."""
    from ..channels.base import ConnectionLost

    done = max((row["step"] for row in loop.metrics), default=loop.start) if loop is not None else 0
    at = f"after step {done} (in the final evaluation)" if done >= cfg.train.steps else f"at step {done + 1}"
    saved = checkpoint.latest(out / CHECKPOINTS / "client")
    if saved is not None:
        then = f"rerunning the same command (once the server is back) resumes from the checkpoint at step {saved}"
    elif not fleet.clients[0].server_info.get("checkpoints"):
        then = ("no checkpoint yet: the server needs --state DIR (and train.checkpoint_every) to resume; "
                "rerunning the same command starts from the start")
    elif not cfg.train.checkpoint_every:
        then = "no checkpoint yet: set train.checkpoint_every to resume mid-run; rerunning the same command starts from the start"
    else:
        then = f"no checkpoint yet (the first is at step {cfg.train.checkpoint_every}); rerunning the same command starts from the start"
    return ConnectionLost(f"the connection to the server was lost {at} ({err}); {then}", err.code)
