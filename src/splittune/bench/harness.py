"""``splittune bench``: one invocation, one machine, every entry of a suite measured side by side.

For each part of the suite (one model), the entries are timed in groups of at most ``GROUP`` plus a
fresh centralized baseline of their own, interleaved round by round (``measure.py``): the headline is
each entry's time per training token as a ratio against the centralized baseline it was interleaved
with. Then every entry's trained model is evaluated (eval loss after the run), entries marked
``memory`` are rerun for a few steps with each party in its own process (``memory.py``), and the
planner predicts every entry so the report can show how far its predictions are from what was measured.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from ..version import __version__
from ..config import ConfigError, RunConfig, load_config
from ..models.zoo import resolve_model
from ..run import resolved
from ..threads import available_cores
from .measure import Timed, pin_threads, summarise
from .memory import party_memory
from .suites import Entry, Part, entry, select, suite

GROUP = 6  # entries timed together (each built once holds its parties: the group bounds memory)
Progress = Callable[[str, int, int], None]  # (what, done, total)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cores": available_cores(), "python": platform.python_version()}
    try:
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    import grpc
    import peft
    import transformers

    return {"splittune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "grpcio": grpc.__version__}


def entry_config(part: Part, e: Entry, sets: tuple[str, ...], rounds: int) -> RunConfig:
    return load_config(None, [f"model={part.model}", *part.sets, *e.sets, *sets, f"train.steps={rounds}"])


BASELINES = ("centralized", "peft")  # in every group, so each entry's rounds pair with theirs


def _groups(names: tuple[str, ...]) -> list[list[str]]:
    bases = [n for n in BASELINES if n in names or n == "centralized"]
    others = [n for n in names if n not in bases]
    return [[*bases, *others[i:i + GROUP]] for i in range(0, max(len(others), 1), GROUP)]


def _build(e: Entry, cfg: RunConfig, source, threads: int):
    if e.name == "peft":
        from .peft_loop import PeftTimed

        return PeftTimed.build(e, cfg, source, threads)
    if e.runs > 1:
        from .runs import TimedRuns

        return TimedRuns.build(e, cfg, source, threads)
    return Timed.build(e, cfg, source, threads)


def time_part(part: Part, sets: tuple[str, ...], reps: int, threads: int, tick: Progress) -> dict[str, dict]:
    """Every entry of ``part`` timed against its group's centralized baseline, then evaluated."""
    source = resolve_model(part.model)
    rounds = part.warmup + reps
    results: dict[str, dict] = {}
    for group in _groups(part.entries):
        timed: list[Timed] = []
        try:
            for name in group:
                e = entry(name)
                tick(f"{part.name}: building {name}", 0, 0)
                try:
                    cfg = entry_config(part, e, sets, rounds)
                    timed.append(_build(e, cfg, source, threads))
                except Exception as err:  # one entry that cannot run (a setting this model refuses) is reported, not fatal
                    if name == "centralized":
                        raise
                    results[name] = {"error": f"{type(err).__name__}: {err}", "config": None}
            for r in range(rounds):
                for k in range(len(timed)):  # each round starts one entry later: no entry always runs first
                    t = timed[(r + k) % len(timed)]
                    t.round()
                    tick(f"{part.name}: round {r + 1}/{rounds} · {t.entry.name}", 1, 0)
            reference = timed[0]
            peft = next((t for t in timed if t.entry.name == "peft"), None)
            for t in timed:
                tick(f"{part.name}: evaluating {t.entry.name}", 0, 0)
                if t.entry.name in BASELINES and t.entry.name in results:
                    continue  # the first group's baselines are the ones reported; later groups' only pair their entries
                figures = summarise(t, part.warmup, None if t is reference else reference,
                                    None if t is peft else peft)
                figures["eval"] = t.evaluate()
                figures["config"] = resolved(t.cfg, source).model_dump(mode="json")
                figures.update(group=t.entry.group, note=t.entry.note, grpc=t.entry.grpc)
                results[t.entry.name] = figures
        finally:
            for t in timed:
                t.close()
    return results


def measure_memory(part: Part, sets: tuple[str, ...], threads: int, workdir: Path, results: dict[str, dict], tick: Progress) -> None:
    for name in part.entries:
        e = entry(name)
        if not e.memory or part.memory_steps == 0 or "error" in results.get(name, {}):
            continue
        tick(f"{part.name}: memory of {name} (each party in its own process)", 0, 0)
        cfg = entry_config(part, e, sets, part.memory_steps)
        try:
            results[name]["memory"] = party_memory(cfg, part.memory_steps, threads, workdir / _slug(name))
        except Exception as err:
            results[name]["memory"] = {"error": str(err)}
        tick(f"{part.name}: memory of {name}", 1, 0)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def total_ticks(parts: list[Part], reps: int | None) -> int:
    n = 0
    for part in parts:
        rounds = part.warmup + (reps or part.reps)
        n += sum(len(g) for g in _groups(part.entries)) * rounds
        if part.memory_steps:
            n += sum(1 for name in part.entries if entry(name).memory)
    return n


def run_bench(suite_name: str, out: Path, *, model: str | None = None, sets: tuple[str, ...] = (), reps: int | None = None,
              only: list[str] | None = None, threads: int | None = None, memory: bool = True,
              progress: Progress | None = None) -> dict[str, Any]:
    """Run a suite and write ``bench.json`` and the report (Markdown, HTML, PNG plots) into ``out``."""
    from .predict import predict_entries
    from .report import write_report

    parts = select(suite(suite_name), only, model)
    if not parts:
        raise ConfigError(f"--only {' '.join(only or [])} leaves no entry besides centralized to compare")
    if reps is not None and reps < 1:
        raise ConfigError(f"--reps {reps}: give at least 1 measured round per entry")
    threads = pin_threads(threads or available_cores())
    tick = progress or (lambda what, done, total: None)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    results: dict[str, Any] = {
        "suite": suite_name, "created": started.isoformat(timespec="seconds"), "machine": machine(), "versions": versions(),
        "threads": threads,
        "threads_how": (f"torch.set_num_threads({threads}) once for the bench process (both parties of an in-process entry "
                        f"share that pool); a server in its own process and each memory run get --threads {threads}"),
        "sets": list(sets), "parts": [],
    }
    for part in parts:
        part_reps = reps or part.reps
        entries = time_part(part, sets, part_reps, threads, tick)
        if memory:
            measure_memory(part, sets, threads, out / "memory" / part.name, entries, tick)
        try:
            predict_entries(part, entries, tick)
        except Exception as err:  # the planner failing must not lose the measurements
            results.setdefault("warnings", []).append(f"predictions for {part.name}: {err}\n{traceback.format_exc(limit=3)}")
        results["parts"].append({"name": part.name, "model": part.model, "warmup": part.warmup, "reps": part_reps,
                                 "sets": list(part.sets), "entries": entries})
    results["wall_s"] = round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)
    shutil.rmtree(out / "memory", ignore_errors=True)  # the memory runs' own directories: their figures are in bench.json
    write_report(results, out)
    return results
