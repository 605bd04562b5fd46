"""``report_to``: a run's steps, evaluations and outcome in the tracking tools people already watch (as
transformers' ``TrainingArguments.report_to``), each through its project's own library.

A ``Tracker`` takes a step's metrics row (what ``metrics.jsonl`` holds), an evaluation's row (``evals.jsonl``)
and, at the end, the run's resolved config, summary and plots. Several clients of one run log into one tracker
run, each row under its client's name. Backends register by name (``tensorboard``); a backend whose library
is missing is one error naming the extra to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import SplittuneError


class TrackingError(SplittuneError, RuntimeError):
    """A tracking backend cannot run here (its library is missing)."""


class Tracker:
    """What a run tells a tracking tool; ``several``: the run has several clients (rows go under each client's name)."""

    name = ""

    def __init__(self, out: Path, several: bool):
        self.out, self.several = out, several

    def step(self, row: dict[str, Any]) -> None:
        """One client step (a metrics row: ``step``, ``client``, ``loss``, ``lr``, bytes, times, penalties …)."""

    def evaluation(self, row: dict[str, Any]) -> None:
        """One evaluation of the global model (``step``, ``loss``, ``ppl``, maybe ``accuracy``)."""

    def finish(self, config: dict[str, Any], summary: dict[str, Any], plots: list[Path]) -> None:
        """The run's end: its resolved config, its summary, its plots."""

    def close(self) -> None:
        pass


BACKENDS: dict[str, Callable[[Path, bool], Tracker]] = {}


def register(name: str):
    def add(cls):
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return add


def scalars(row: dict[str, Any], skip: tuple[str, ...] = ("step", "client")) -> dict[str, float]:
    """The numbers of a row a tracker plots (not its step and client, which place them; not booleans)."""
    return {k: float(v) for k, v in row.items() if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def open_trackers(names: list[str], out: Path, several: bool) -> list[Tracker]:
    """The trackers ``report_to`` names (``none`` and an empty list: none)."""
    from . import tensorboard  # noqa: F401  (registers its backend)

    return [BACKENDS[name](out, several) for name in names if name != "none"]
