"""``report_to``: a run's steps, evaluations and outcome in the tracking tools people already watch (as
transformers' ``TrainingArguments.report_to``), each through its project's own library.

A ``Tracker`` takes a step's metrics row (what ``metrics.jsonl`` holds), an evaluation's row (``evals.jsonl``)
and, at the end, the run's resolved config, summary and plots. Several clients of one run log into one tracker
run, each row under its client's name. Backends register by name (``tensorboard``, ``mlflow``, ``wandb``); a
backend whose library is missing is one error naming the extra to install.

Each backend notes in ``RUN_DIR/tracking.json`` how to find its run again (a run id, a store), so that what is
learnt about a run later (``splittune attack``'s scores) lands in the same tracker run.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable

from ..errors import SplittuneError


class TrackingError(SplittuneError, RuntimeError):
    """A tracking backend cannot run here (its library is missing)."""


class Tracker:
    """What a run tells a tracking tool; ``several``: the run has several clients (rows go under each client's name);
    ``resume``: reopen the tracker run this run directory already has (to add what was learnt after training)."""

    name = ""

    def __init__(self, out: Path, several: bool, resume: bool = False):
        self.out, self.several, self.resume = out, several, resume

    def step(self, row: dict[str, Any]) -> None:
        """One client step (a metrics row: ``step``, ``client``, ``loss``, ``lr``, bytes, times, penalties …)."""

    def evaluation(self, row: dict[str, Any]) -> None:
        """One evaluation of the global model (``step``, ``loss``, ``ppl``, maybe ``accuracy``)."""

    def finish(self, config: dict[str, Any], summary: dict[str, Any], plots: list[Path]) -> None:
        """The run's end: its resolved config, its summary, its plots."""

    def attack(self, name: str, scores: dict[str, float], step: int) -> None:
        """An attack's scores on this run (``splittune attack``), logged after training at the run's last step."""

    def close(self) -> None:
        pass


BACKENDS: dict[str, Callable[..., Tracker]] = {}
RECORD = "tracking.json"  # per backend, how to find its run again
ADAPTERS = "adapters"  # the run's adapter directory (run/adapters.py's ADAPTERS; a test keeps them equal)


def register(name: str):
    def add(cls):
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return add


def scalars(row: dict[str, Any], skip: tuple[str, ...] = ("step", "client")) -> dict[str, float]:
    """The numbers of a row a tracker plots (not its step and client, which place them; not booleans)."""
    return {k: float(v) for k, v in row.items() if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level, its keys joined with dots (``lora.rank``): how parameters and summaries are named."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def remember(out: Path, name: str, how: dict[str, Any]) -> None:
    """Note in ``RUN_DIR/tracking.json`` how backend ``name`` finds this run's tracker run again."""
    path = out / RECORD
    record = json.loads(path.read_text()) if path.exists() else {}
    record[name] = how
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


def recall(out: Path, name: str) -> dict[str, Any]:
    """What backend ``name`` noted about this run (an error when it logged nothing here)."""
    path = out / RECORD
    record = json.loads(path.read_text()) if path.exists() else {}
    if name not in record:
        raise TrackingError(f"{out} has no {name} run to add to ({RECORD} does not name one)")
    return record[name]


def _load_backends() -> None:
    """Each backend module registers itself on import; its library loads only when a tracker opens."""
    for module in ("tensorboard", "mlflow", "wandb"):
        importlib.import_module(f"{__name__}.{module}")


def open_trackers(names: list[str], out: Path, several: bool) -> list[Tracker]:
    """The trackers ``report_to`` names (``none`` and an empty list: none), each in a new tracker run; one that cannot
    open closes those opened before it. A record left by an earlier run in this directory is dropped first."""
    _load_backends()
    (out / RECORD).unlink(missing_ok=True)
    opened: list[Tracker] = []
    try:
        for name in names:
            if name != "none":
                opened.append(BACKENDS[name](out, several))
    except BaseException:
        for tracker in opened:
            tracker.close()
        (out / RECORD).unlink(missing_ok=True)  # a run that never started has no tracker runs to add to
        raise
    return opened


def log_attack(run_dir: Path, name: str, result: dict[str, Any]) -> list[str]:
    """An attack's scores into every tracker run ``run_dir`` logged to (none: nothing); returns the backends' names."""
    path = run_dir / RECORD
    if not path.exists():
        return []
    _load_backends()
    summary = run_dir / "summary.json"
    step = int(json.loads(summary.read_text()).get("steps", 0)) if summary.exists() else 0
    scores = scalars(result, skip=("seconds",))
    names = [n for n in json.loads(path.read_text()) if n in BACKENDS]
    for backend in names:
        tracker = BACKENDS[backend](run_dir, False, resume=True)
        try:
            tracker.attack(name, scores, step)
        finally:
            tracker.close()
    return names
