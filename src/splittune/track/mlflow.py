"""MLflow, through its own client (``MlflowClient``): by default a file store in ``RUN_DIR/mlruns``, or the
store ``MLFLOW_TRACKING_URI`` names (a server, a shared database) so that many runs land in one place.

One MLflow run per splittune run, in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``splittune``), named
after the run directory. Parameters: the resolved config, flattened (``lora.rank``). Metrics: each step under
``train/…`` (``client{i}/train/…`` with several clients), each evaluation under ``eval/…``, the summary's numbers
under ``summary/…`` (ε spent included, where a defense reports one), later an attack's scores under
``attack/NAME/…``. Artifacts: the config and summary as JSON, the plots, the adapter directory.

MLflow 3 keeps its file store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``; a run that logs to a
file store has chosen it, so this backend opts in (for a file store only). The file store needs nothing
beyond ``mlflow-skinny``; ``mlflow ui`` (the full ``mlflow``) shows it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from . import ADAPTERS, Tracker, TrackingError, flatten, recall, register, remember, scalars

DIR = "mlruns"
EXPERIMENT = "splittune"
LONGEST = 6000  # MLflow's limit on a parameter's value (characters)
BATCH = 100  # parameters per log_batch call (MLflow's limit; metrics allow 1000)


def store_uri(out: Path) -> str:
    """Where this run's MLflow run goes: ``MLFLOW_TRACKING_URI``, or a file store in ``RUN_DIR/mlruns``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (out / DIR).resolve().as_uri()


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= LONGEST else text[: LONGEST - 1] + "…"


@register("mlflow")
class MLflow(Tracker):
    def __init__(self, out: Path, several: bool, resume: bool = False):
        super().__init__(out, several, resume)
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Metric, Param, RunStatus
            from mlflow.exceptions import MlflowException
        except ImportError:
            raise TrackingError("report_to: mlflow needs the mlflow-skinny package: pip install 'splittune[tracking]'") from None
        self._Metric, self._Param, self._status = Metric, Param, RunStatus
        self.finished = False
        uri = recall(out, self.name)["tracking_uri"] if resume else store_uri(out)
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if resume:
                self.run_id = recall(out, self.name)["run_id"]
                self.client.get_run(self.run_id)
            else:
                self.run_id = self._start(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
                remember(out, self.name, {"tracking_uri": uri, "run_id": self.run_id})
        except MlflowException as err:
            raise TrackingError(f"report_to: mlflow cannot use the store {uri}: {err.message}") from None

    def _start(self, experiment: str) -> str:
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        run = self.client.create_run(experiment_id, run_name=self.out.name,
                                     tags={"splittune.run_dir": str(self.out.resolve()), "splittune.clients": "several" if self.several else "one"})
        return run.info.run_id

    def _metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._Metric(k, v, now, step) for k, v in values.items()])

    def step(self, row: dict[str, Any]) -> None:
        prefix = f"client{row['client']}/train" if self.several else "train"
        self._metrics({f"{prefix}/{k}": v for k, v in scalars(row).items()}, row["step"])

    def evaluation(self, row: dict[str, Any]) -> None:
        self._metrics({f"eval/{k}": v for k, v in scalars(row).items()}, row["step"])

    def finish(self, config: dict[str, Any], summary: dict[str, Any], plots: list[Path]) -> None:
        params = [self._Param(k, _param(v)) for k, v in flatten(config).items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i: i + BATCH])
        self._metrics({f"summary/{k}": v for k, v in scalars(flatten(summary), skip=()).items()}, int(summary.get("steps", 0)))
        self.client.log_dict(self.run_id, config, "config.json")
        self.client.log_dict(self.run_id, summary, "summary.json")
        for plot in plots:
            self.client.log_artifact(self.run_id, str(plot), "plots")
        if (self.out / ADAPTERS).is_dir():
            self.client.log_artifacts(self.run_id, str(self.out / ADAPTERS), ADAPTERS)
        self.finished = True

    def attack(self, name: str, scores: dict[str, float], step: int) -> None:
        self._metrics({f"attack/{name}/{k}": v for k, v in scores.items()}, step)

    def close(self) -> None:
        if not self.resume:  # a run that stopped before its end is marked so (a resumed run starts a new MLflow run)
            status = self._status.FINISHED if self.finished else self._status.FAILED
            self.client.set_terminated(self.run_id, self._status.to_string(status))
