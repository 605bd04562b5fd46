"""One comparison: the same data and budget trained centralized, federated and split under every schedule.

Every entry sees the same training examples: each of N clients takes ``train.steps`` steps, and the
centralized baseline takes ``N × train.steps`` steps on the clients' data pooled. Curves are drawn
against examples seen (one point per evaluation) and against bytes sent and received.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError, RunConfig, validate
from .report.plots import plot_compare
from .rundir import RunLock
from .run import train

ENTRIES = ("centralized", "federated", "sequential", "sfl-v1", "sfl-v2")


def entry_config(cfg: RunConfig, name: str) -> RunConfig:
    """``cfg`` as entry ``name`` runs it (re-validated: some schedules refuse some settings)."""
    tree = cfg.model_dump()
    n, t = cfg.clients, cfg.train
    every = t.eval_every or _eval_every(t.steps, cfg.aggregate_every)
    tree["train"]["eval_every"] = every
    if name == "centralized":
        tree.update(mode="centralized", personal=[])
        tree["train"].update(steps=t.steps * n, eval_every=every * n)
    elif name == "federated":
        tree.update(mode="federated", personal=[])
    else:
        tree.update(mode="split", schedule=name)
    return validate(tree)


def _eval_every(steps: int, aggregate_every: int) -> int:
    """About four evaluations per run, at a multiple of the averaging period (the global model exists there)."""
    target = max(1, steps // 4)
    return max(aggregate_every, (target // aggregate_every) * aggregate_every)


def compare(cfg: RunConfig, out: Path, progress: Callable[[str, int, int, dict], None] | None = None,
            entries: tuple[str, ...] = ENTRIES) -> dict[str, Any]:
    """Run every entry into ``out/<entry>/``; write ``compare.json`` and ``compare.png``; return the results.

    ``out`` is locked while the comparison runs (and each entry's directory while it runs).
    """
    with RunLock(out, "compare"):
        return _compare(_layout(cfg), out, progress, entries)


def _layout(cfg: RunConfig) -> RunConfig:
    """With ``cuts: auto`` and segments that train differently, the baselines (no cuts) need the split's real cuts
    to train the same blocks the same way; otherwise every entry resolves its own (split) or has none."""
    if cfg.cuts is not None or len({cfg.segments.bottom, cfg.segments.trunk, cfg.segments.top}) == 1:
        return cfg
    from .models.arch import detect_arch
    from .models.zoo import resolve_model

    return cfg.model_copy(update={"mode": "split"}).resolve(detect_arch(resolve_model(cfg.model).config()).n_blocks).model_copy(
        update={"mode": cfg.mode})


def _compare(cfg: RunConfig, out: Path, progress, entries: tuple[str, ...]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    curves: dict[str, list[dict]] = {}
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    for name in entries:
        try:
            entry = entry_config(cfg, name)
        except ConfigError as err:
            results[name] = {"skipped": str(err)}
            continue
        run_dir = out / name
        hook = (lambda done, total, row, name=name: progress(name, done, total, row)) if progress else None
        summary = train(entry, run_dir, hook)
        results[name] = summary
        scale = per_step * (1 if name == "centralized" else cfg.clients)
        evals = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
        curves[name] = [{"examples": e["step"] * scale, "bytes": e["train_bytes"], "loss": e["loss"]} for e in evals]
        results[name]["curve"] = curves[name]
    (out / "compare.json").write_text(json.dumps({"clients": cfg.clients, "steps_per_client": cfg.train.steps,
                                                  "entries": results}, indent=2))
    if curves:
        plot_compare(curves, out / "compare.png", f"{cfg.model} · {cfg.clients} clients · {cfg.data.source}")
    return results
