"""splittune from Python: the same runs as the command line, with the config as a file, a dict or a ``RunConfig``.

    import splittune
    summary = splittune.train("examples/defended.yaml", out="runs/defended", overrides=["train.steps=10"])
    summary["eval_ppl_after"], summary.get("dx_epsilon")

``train`` returns the run's summary (what ``summary.json`` holds) and writes the same run directory as
``splittune train --out``: metrics, adapters, checkpoints; the same call again resumes it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import RunConfig, apply_override, load_config, validate
from .run import train as run_train


def configure(source: RunConfig | dict | str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """A validated run config from a YAML file, a dict (the YAML's content) or a ``RunConfig``, with ``--set``-style
    ``overrides`` (``"train.steps=10"``) applied; errors are ``ConfigError`` naming the key and what is allowed."""
    if isinstance(source, RunConfig):
        source = source.model_dump(mode="json")
    if isinstance(source, dict):
        tree = copy.deepcopy(source)
        for assignment in overrides:
            apply_override(tree, assignment)
        return validate(tree)
    return load_config(Path(source) if source is not None else None, list(overrides))


def train(source: RunConfig | dict | str | Path | None = None, out: str | Path = "runs/run", *, overrides: Iterable[str] = (),
          progress: Callable[[int, int, dict], None] | None = None, record_tap: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run a config (``source``: as ``configure`` takes it; None: the defaults, the builtin model and data) into the run
    directory ``out`` and return its summary. ``progress(done, total, row)`` is called after every step with its
    metrics row; ``record_tap`` names the observers whose view is recorded (``server``, ``aggregator``,
    ``eavesdropper``)."""
    return run_train(configure(source, overrides), Path(out), progress=progress, record_tap=tuple(record_tap))
