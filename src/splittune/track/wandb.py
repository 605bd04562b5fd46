"""Weights & Biases, through ``wandb``: one W&B run per splittune run, its files in ``RUN_DIR/wandb``.

Offline unless the user is logged in (``WANDB_API_KEY``, or a netrc entry for the W&B host), so a run never
reaches for the network on its own; ``WANDB_MODE`` set by the user wins. ``wandb sync RUN_DIR/wandb/offline-run-*``
uploads an offline run later. Project ``WANDB_PROJECT`` (default ``splittune``), the run named after its directory.

Every row is its own history entry carrying the run's ``step`` (W&B's own step counter only grows, and several
clients report the same step): steps under ``train/…`` (``client{i}/train/…`` with several clients), evaluations
under ``eval/…``. At the end: the resolved config as the run's config, the summary's numbers as ``summary/…`` in
the run summary (ε spent included), the plots as images, the adapter directory as a ``model`` artifact (read in
place when synced: not copied into W&B's cache, so keep the run directory until then); later, an
attack's scores as ``attack/NAME/…`` in the summary of the same run (resumed by its id).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from . import ADAPTERS, Tracker, TrackingError, flatten, recall, register, remember, scalars

PROJECT = "splittune"
STEP = "step"  # the history key every metric is plotted against
MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")  # what wandb.init accepts


def logged_in() -> bool:
    """Whether W&B has credentials here without asking the network: an API key in the environment or in netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


@register("wandb")
class WandB(Tracker):
    def __init__(self, out: Path, several: bool, resume: bool = False):
        super().__init__(out, several, resume)
        try:
            import wandb
        except ImportError:
            raise TrackingError("report_to: wandb needs the wandb package: pip install 'splittune[tracking]'") from None
        self.wandb, self.finished = wandb, False
        mode = os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")
        if mode not in MODES:
            raise TrackingError(f"report_to: wandb: WANDB_MODE={mode!r} is not one of {', '.join(MODES)}")
        known = recall(out, self.name) if resume else {}
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)  # our output stays ours; no system sampling
        try:
            self.run = wandb.init(project=known.get("project") or os.environ.get("WANDB_PROJECT") or PROJECT,
                                  name=out.name, dir=str(out), mode=mode, settings=settings, reinit="create_new",
                                  **({"id": known["id"], "resume": "allow"} if resume else {}))
        except wandb.Error as err:
            raise TrackingError(f"report_to: wandb could not start a run ({mode}): {err}") from None
        if not resume and mode != "disabled":  # (a disabled run has nothing to add to later)
            remember(out, self.name, {"id": self.run.id, "project": self.run.project, "mode": mode})
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)

    def step(self, row: dict[str, Any]) -> None:
        prefix = f"client{row['client']}/train" if self.several else "train"
        self.run.log({STEP: row["step"], **{f"{prefix}/{k}": v for k, v in scalars(row).items()}})

    def evaluation(self, row: dict[str, Any]) -> None:
        self.run.log({STEP: row["step"], **{f"eval/{k}": v for k, v in scalars(row).items()}})

    def finish(self, config: dict[str, Any], summary: dict[str, Any], plots: list[Path]) -> None:
        self.run.config.update(config, allow_val_change=True)
        self.run.summary.update({f"summary/{k}": v for k, v in scalars(flatten(summary), skip=()).items()})
        steps = int(summary.get("steps", 0))
        if plots:
            self.run.log({STEP: steps, **{f"plots/{p.stem}": self.wandb.Image(str(p)) for p in plots}})
        if (self.out / ADAPTERS).is_dir():
            artifact = self.wandb.Artifact(f"adapter-{self.run.id}", type="model", metadata={"run_dir": self.out.name})
            artifact.add_dir(str(self.out / ADAPTERS), policy="immutable")  # read in place at upload, not copied to a cache
            self.run.log_artifact(artifact)
        self.finished = True

    def attack(self, name: str, scores: dict[str, float], step: int) -> None:
        self.run.summary.update({f"attack/{name}/{k}": v for k, v in scores.items()})

    def close(self) -> None:
        self.run.finish(exit_code=0 if self.finished or self.resume else 1)  # a run that stopped early shows as failed
