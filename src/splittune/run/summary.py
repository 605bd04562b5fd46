"""What a run did, in numbers: each step's time breakdown, and the run's summary (summary.json)."""

from __future__ import annotations

import platform
import time
from typing import TYPE_CHECKING, Any

import torch

from ..version import __version__
from .opening import usage_of
from ..device import peak_memory
from ..parties.cache import MIRROR_COUNTS
from ..defenses import Usage, guarantees

if TYPE_CHECKING:
    from .loop import Loop


def time_breakdown(step_s: float, stats: dict) -> dict[str, Any]:
    """Where a client step's time went (docs/efficiency.md): this client's compute and codecs, the time it
    waited for replies; of the round trips, the server's own time and the rest (the wire, queues and the
    server's encoding of its reply). With pipelining, waits overlap the server's work, so the parts of one
    side need not add up to the other's."""
    row = {"compute_s": round(max(step_s - stats["wait_s"] - stats["codec_s"], 0.0), 6), "codec_s": round(stats["codec_s"], 6),
           "wait_s": round(stats["wait_s"], 6), "server_s": round(stats["server_s"], 6), "wire_s": round(stats["wire_s"], 6)}
    for direction, error in stats["error"].items():
        if error is not None:
            row[f"codec_error_{direction}"] = error
    return row


def step_breakdown(rows: list[dict]) -> dict[str, Any]:
    """The median step's time breakdown (one step's own parts, so the client's compute, codecs and waiting add up to
    its ``step_s``; medians of each part taken apart would not) and each direction's mean codec error."""
    out: dict[str, Any] = {}
    parts = [k for k in BREAKDOWN if rows and all(k in r for r in rows)]
    if parts:
        median = sorted(rows, key=lambda r: r["step_s"])[len(rows) // 2]
        out["time_median_s"] = {"step_s": median["step_s"], **{k: median[k] for k in parts}}
    for direction in ("up", "down"):
        errors = [r[f"codec_error_{direction}"] for r in rows if f"codec_error_{direction}" in r]
        if errors:
            out[f"codec_error_{direction}"] = sum(errors) / len(errors)
    return out


BREAKDOWN = ("compute_s", "codec_s", "wait_s", "server_s", "wire_s")


def title(loop: "Loop") -> str:
    plan = loop.fleet.clients[0].plan
    who = f" · {loop.total} clients · {loop.schedule}" if loop.total > 1 else ""
    cuts = f"cuts {loop.cfg.cuts}" if loop.cfg.cuts is not None else "no cuts"
    return f"{loop.cfg.model} · {plan.shape} · {cuts}{who}"


# -- summary ---------------------------------------------------------------------------------------
def summarize(loop: "Loop", before: dict, after: dict, own_before: list[dict], own_after: list[dict]) -> dict[str, Any]:
    cfg, t = loop.cfg, loop.cfg.train
    clients = loop.fleet.clients
    steps = [m["step"] for m in loop.metrics]  # (sampled rounds may leave this process's clients out of the first or last)
    first = [m for m in loop.metrics if m["step"] == min(steps)]
    last = [m for m in loop.metrics if m["step"] == max(steps)]
    step_times = sorted(m["step_s"] for m in loop.metrics)
    server_info = clients[0].server_info
    summary = {
        "mode": cfg.mode,
        "schedule": loop.schedule,
        "clients": loop.total,
        "shape": clients[0].plan.shape,
        "model": cfg.model,
        "cuts": list(cfg.cuts) if cfg.cuts is not None else None,
        "steps": t.steps,
        "seed": cfg.seed,
        "task": loop.pooled.kind,
        "train_examples": sum(len(task.train) for task in loop.tasks),
        "eval_examples": len(loop.pooled.eval),
        "train_loss_first": sum(m["loss"] for m in first) / len(first),
        "train_loss_last": sum(m["loss"] for m in last) / len(last),
        "eval_loss_before": before["loss"],
        "eval_loss_after": after["loss"],
        "eval_ppl_before": before["ppl"],
        "eval_ppl_after": after["ppl"],
        "bytes_up": sum(b[0] for b in loop.train_bytes) + sum(b[0] for b in loop.sync_bytes),
        "bytes_down": sum(b[1] for b in loop.train_bytes) + sum(b[1] for b in loop.sync_bytes),
        "sync_bytes_up": sum(b[0] for b in loop.sync_bytes),
        "sync_bytes_down": sum(b[1] for b in loop.sync_bytes),
        "eval_bytes_up": sum(e.get("bytes_up", 0) for e in loop.evals),
        "eval_bytes_down": sum(e.get("bytes_down", 0) for e in loop.evals),
        "wall_s": round(time.perf_counter() - loop.started, 3),
        "step_s_mean": sum(step_times) / len(step_times),
        "step_s_median": step_times[len(step_times) // 2],
        "device": str(clients[0].party.device),
        "threads": torch.get_num_threads(),
        "peak_memory": peak_memory(clients[0].party.device),  # this process's (both parties' in-process)
        "server_device": server_info.get("device"),
        "client_params": clients[0].party.weights.params,
        "client_bytes": clients[0].party.weights.bytes,
        "client_trainable": clients[0].party.trainable_params,
        "server_params": server_info.get("params", 0),
        "server_bytes": server_info.get("bytes", 0),
        "server_trainable": server_info.get("trainable", 0),
        "versions": {"splittune": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    if loop.undefended is not None:  # in-process runs with a defense that changes what is evaluated
        summary["eval_ppl_undefended"] = loop.undefended["ppl"]
        summary["eval_loss_undefended"] = loop.undefended["loss"]
    if "accuracy" in before:
        summary["eval_accuracy_before"] = before["accuracy"]
        summary["eval_accuracy_after"] = after["accuracy"]
    if loop.roster.samples:  # client sampling: each round's clients, as drawn from the seed
        rounds = -(-t.steps // cfg.aggregate_every)
        summary["clients_per_round"] = loop.roster.size
        summary["sampled"] = [loop.roster.of(r) for r in range(1, rounds + 1)]
    scaled = [m for m in loop.metrics if "loss_scale" in m]
    if scaled:  # float16: the loss scale the last step ran at, and the steps an overflow skipped
        summary["loss_scale_last"] = scaled[-1]["loss_scale"]
        summary["steps_skipped"] = sum(1 for m in scaled if m["skipped"])
    summary["opening"] = loop.opening  # what the console said before the first step (ε as planned for the whole run)
    summary.update(step_breakdown(loop.metrics))
    summary.update(guarantees(cfg, usage(loop), clients[0].defenses))
    if clients[0].split:
        summary["cache"] = cache_summary(loop)
    summary["per_client"] = [client_entry(loop, i, own_before[i], own_after[i]) for i in range(loop.n)]
    return summary


def usage(loop: "Loop") -> Usage:
    """What this run did that its defenses' guarantees depend on: the steps each client took, the evaluations."""
    steps = [sum(1 for m in loop.metrics if m["client"] == c) for c in loop.index]
    return usage_of(loop, steps, len(loop.evals) + (2 * loop.n if loop.total > 1 else 0), loop.metrics)


def cache_summary(loop: "Loop") -> dict[str, Any]:
    """The activation cache over this process's clients: whether it ran (or why not) and what it saved."""
    first = loop.fleet.clients[0]
    counts = dict.fromkeys(MIRROR_COUNTS, 0)
    for client in loop.fleet.clients:
        for key, value in client.cache_counts().items():
            counts[key] += value
    return {"on": first.cache is not None, "off_reason": first.cache_off,
            "max_bytes": first.cache.max_bytes if first.cache is not None else 0, **counts,
            "bottom_s": round(sum(r.get("bottom_s", 0.0) for r in loop.metrics), 6)}


def client_entry(loop: "Loop", i: int, before: dict, after: dict) -> dict[str, Any]:
    client, task = loop.fleet.clients[i], loop.tasks[i]
    rows = [m for m in loop.metrics if m["client"] == loop.index[i]]
    entry = {
        "client": loop.index[i],
        "cuts": list(client.party.session.cuts),
        "lora_rank": client.party.session.lora_rank,
        "samples": len(task.train),
        "train_examples": len(task.train),
        "eval_examples": len(task.eval),
        "data": {k: v for k, v in task.stats.items() if k in ("source", "documents", "records", "labels")},
        "train_steps": len(rows),
        "train_loss_last": rows[-1]["loss"] if rows else None,  # (None: no round sampled this client)
        "eval_loss_before": before["loss"],
        "eval_loss_after": after["loss"],
        "bytes_up": loop.train_bytes[i][0] + loop.sync_bytes[i][0],
        "bytes_down": loop.train_bytes[i][1] + loop.sync_bytes[i][1],
        "sync_bytes_up": loop.sync_bytes[i][0],
        "sync_bytes_down": loop.sync_bytes[i][1],
        "client_params": client.party.weights.params,
        "client_trainable": client.party.trainable_params,
    }
    if "accuracy" in before:
        entry["eval_accuracy_before"], entry["eval_accuracy_after"] = before["accuracy"], after["accuracy"]
    return entry
