"""What a run is about to do, said before its first step (the console's opening lines; ``summary.json`` keeps the
same figures): the task and its examples, rows cut to length, the dtype, what each party trains, the cuts, the
codec, and each defense with the ε it will have spent by the last step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..defenses import Usage, guarantees
from ..defenses.dp_sgd import sample_rate
from ..dpmath.accounting import most_releases

if TYPE_CHECKING:
    from .loop import Loop


def usage_of(loop: "Loop", steps: list[int], eval_passes: int, metrics: list[dict]) -> Usage:
    """What a run's defenses' guarantees depend on, for ``steps`` taken by each of this process's clients: the most
    batches one example was in (releases), the evaluation passes, the largest sampling rate."""
    t = loop.cfg.train
    per_step, sizes = t.batch_size * t.grad_accum, [len(task.train) for task in loop.tasks]
    return Usage(t.seq_len, per_step, max(most_releases(n, per_step, k) for n, k in zip(sizes, steps)), max(steps),
                 eval_passes, metrics, max(sample_rate(per_step, n) for n in sizes))


def planned_usage(loop: "Loop") -> Usage:
    """The usage if the run goes to its last step, at most: a client in every step (a turn-taking schedule gives each
    fewer), the evaluations before and after and every ``eval_every``."""
    t = loop.cfg.train
    evals = 2 + (t.steps // t.eval_every - (t.steps % t.eval_every == 0) if t.eval_every else 0)
    return usage_of(loop, [t.steps] * len(loop.tasks), evals, [])


def opening(loop: "Loop") -> dict[str, Any]:
    cfg, client = loop.cfg, loop.fleet.clients[0]
    out: dict[str, Any] = {
        "task": loop.pooled.kind,
        "train_examples": sum(len(task.train) for task in loop.tasks),
        "eval_examples": len(loop.pooled.eval),
        "truncated_examples": sum(task.stats.get("truncated", 0) for task in loop.tasks),
        "dropped_examples": sum(task.stats.get("dropped", 0) for task in loop.tasks),
        "dtype": cfg.train.dtype,
        "client_trainable": client.party.trainable_params,
        "server_trainable": client.server_info.get("trainable", 0),
        "cuts": list(cfg.cuts) if cfg.cuts is not None else None,
        "codec": cfg.codec.model_dump(mode="json") if client.split else None,
    }
    planned = guarantees(cfg, planned_usage(loop), client.defenses)
    names = [d.name for d in cfg.defense] + (["dp_sgd"] if cfg.dp_sgd is not None else [])
    out["defenses"] = {n: planned.get(f"{n.replace('-', '_')}_epsilon") for n in names}  # None: no ε (or no noise)
    return out
