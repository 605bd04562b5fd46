"""report_to: [tensorboard, mlflow, wandb] in one run of two clients: each tool holds what metrics.jsonl and
evals.jsonl hold, value for value, each client under its own name, with the config, the summary (ε spent
included), the plot and the adapter directory; an attack's scores land later in the same three runs. Read back
through each tool's own reader (TensorBoard's event accumulator, MLflow's client, W&B's transaction log)."""

import base64
import hashlib
import json

import pytest
import yaml

from configs import tiny
from typer.testing import CliRunner

from splittune.cli import app
from splittune.track import RECORD, TrackingError, log_attack, open_trackers, recall, scalars
from wandb_log import offline_runs

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

GAUSS = "defense=[{name: gaussian, sigma: 0.5, clip: 1.0}]"  # a defense that reports the ε it spent
INVERTER = ["--set", "model=linear", "--set", "epochs=1", "--set", "aux_rows=16", "--set", "random_rows=0"]  # cheap: scores, not quality
RUN = tiny("cuts=[1,3]", "train.steps=2", "data.max_documents=8", "train.eval_every=1", "clients=2", "schedule=sfl-v1",
           GAUSS, "report_to=[tensorboard, mlflow, wandb]")


def offline_env(mp, home):
    """No credentials, nothing written outside ``home``, nothing sent anywhere: W&B must go offline on its own."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        mp.delenv(name, raising=False)
    (home / "netrc").write_text("")
    mp.setenv("NETRC", str(home / "netrc"))
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        mp.setenv(name, str(home / name.lower()))
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def adapter_files(out, digest="sha256"):
    """Every file of the adapter directory, by relative path, with its digest (md5 in base64, as W&B names files)."""
    files = sorted(p for p in (out / "adapters").rglob("*") if p.is_file())
    hashed = {str(p.relative_to(out / "adapters")): hashlib.new(digest, p.read_bytes()).digest() for p in files}
    return {k: base64.b64encode(v).decode() for k, v in hashed.items()}


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from splittune.config import load_config
    from splittune.run import train

    home = tmp_path_factory.mktemp("tracking")
    out = home / "run"
    with pytest.MonkeyPatch.context() as mp:
        offline_env(mp, home)
        summary = train(load_config(None, RUN), out, record_tap=("server",))
        attack = CliRunner().invoke(app, ["attack", str(out), "--attack", "inversion", *INVERTER])
    assert attack.exit_code == 0 and "scores added to the run's tracking: tensorboard, mlflow, wandb" in attack.output, attack.output
    return out, summary, jsonl(out / "metrics.jsonl"), jsonl(out / "evals.jsonl")


def scores(out):
    return json.loads((out / "attacks" / "inversion" / "attack.json").read_text())


def test_mlflow_holds_every_step_evaluation_and_the_outcome(run):
    out, summary, metrics, evals = run
    record = json.loads((out / RECORD).read_text())["mlflow"]
    assert record["tracking_uri"] == (out / "mlruns").resolve().as_uri()  # the file store in the run directory
    client = mlflow.MlflowClient(tracking_uri=record["tracking_uri"])
    found = client.get_run(record["run_id"])
    assert found.info.status == "FINISHED" and found.info.run_name == out.name
    history = {}
    for key in found.data.metrics:
        history[key] = {(m.step, m.value) for m in client.get_metric_history(record["run_id"], key)}
    assert {0, 1} == {r["client"] for r in metrics}
    for row in metrics:
        for key, value in scalars(row).items():
            assert (row["step"], value) in history[f"client{row['client']}/train/{key}"], (key, row)
    assert len(history["client0/train/loss"]) == len([r for r in metrics if r["client"] == 0])  # no extra points
    assert history["eval/loss"] == {(r["step"], r["loss"]) for r in evals} and len(evals) == 3
    assert found.data.metrics["summary/gaussian_epsilon"] == summary["gaussian_epsilon"] > 0  # ε spent
    assert found.data.metrics["summary/eval_loss_after"] == summary["eval_loss_after"]
    assert history["attack/inversion/rouge_l_f1"] == {(2, scores(out)["rouge_l_f1"])} and "attack/inversion/seconds" not in history
    params = found.data.params
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert params["lora.rank"] == str(config["lora"]["rank"]) and params["cuts"] == "[1, 3]"
    assert params["report_to"] == '["tensorboard", "mlflow", "wandb"]' and params["clients"] == "2"
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"config.json", "summary.json", "plots", "adapters"} <= artifacts
    assert [a.path for a in client.list_artifacts(record["run_id"], "plots")] == ["plots/loss.png"]
    client.download_artifacts(record["run_id"], "adapters", str(out.parent / "downloaded"))
    assert adapter_files(out) == adapter_files(out.parent / "downloaded")


def test_wandb_offline_run_holds_every_step_evaluation_and_the_outcome(run):
    out, summary, metrics, evals = run
    record = json.loads((out / RECORD).read_text())["wandb"]
    assert record["mode"] == "offline"  # no credentials: W&B never reached for the network
    first, later = offline_runs(out)  # the run, and the attack's resumption of it (same id)
    assert first.run.run_id == later.run.run_id == record["id"] and first.run.display_name == out.name
    points = {}
    for row in first.history:
        for key, value in row.items():
            if not key.startswith("_") and key != "step":
                points.setdefault(key, []).append((row["step"], value))
    for row in metrics:
        for key, value in scalars(row).items():
            assert (row["step"], value) in points[f"client{row['client']}/train/{key}"], (key, row)
    assert len(points["client1/train/loss"]) == len([r for r in metrics if r["client"] == 1])
    assert points["eval/loss"] == [(r["step"], r["loss"]) for r in evals]
    assert points["plots/loss/_type"] == [(summary["steps"], "image-file")]  # (an image's fields are nested keys)
    image = first.folder / "files" / points["plots/loss/path"][0][1]
    assert image.read_bytes() == (out / "loss.png").read_bytes()
    assert first.summary["summary/gaussian_epsilon"] == summary["gaussian_epsilon"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert first.config["lora"] == config["lora"] and first.config["clients"] == 2 and first.config["cuts"] == [1, 3]
    assert later.summary["attack/inversion/token_accuracy"] == scores(out)["token_accuracy"]
    (artifact,) = first.artifacts
    assert artifact.type == "model" and {e.path: e.digest for e in artifact.manifest.contents} == adapter_files(out, "md5")
    assert not list((out.parent / "wandb_data_dir").rglob("*.safetensors"))  # read in place, not copied to a cache


def test_tensorboard_in_the_same_run_holds_the_attack_too(run):
    out, summary, metrics, _ = run
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    row = metrics[-1]
    (event,) = [e for e in acc.Scalars(f"client{row['client']}/train/loss") if e.step == row["step"]]
    assert event.value == pytest.approx(row["loss"], rel=1e-6)
    assert acc.Scalars("summary/gaussian_epsilon")[0].value == pytest.approx(summary["gaussian_epsilon"], rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("attack/inversion/rouge_l_f1")] == [(2, pytest.approx(scores(out)["rouge_l_f1"]))]


def test_a_run_that_logged_nowhere_takes_no_attack_scores(tmp_path):
    assert log_attack(tmp_path, "inversion", {"rouge_l_f1": 0.25}) == []
    assert not list(tmp_path.iterdir())
    (tmp_path / RECORD).write_text(json.dumps({"wandb": {"id": "x", "project": "p", "mode": "offline"}}))
    with pytest.raises(TrackingError, match="has no mlflow run to add to"):  # a backend it did not log to
        recall(tmp_path, "mlflow")


def test_a_privacy_grid_adds_the_scores_it_computed_not_those_it_reused(tmp_path):
    """`splittune privacy`: each setting's run (cells/NAME) gets its fresh attack scores; a resumed grid's reused ones
    are not logged twice (here through TensorBoard, which a hand-made cell can name without training)."""
    import os
    import time

    from splittune.cli.privacy import _track_grid

    since = time.time()
    for name, fresh in (("none", True), ("gaussian", False)):
        cell = tmp_path / "cells" / name
        (cell / "attacks" / "inversion").mkdir(parents=True)
        (cell / RECORD).write_text(json.dumps({"tensorboard": {"logdir": "tensorboard"}}))
        (cell / "summary.json").write_text(json.dumps({"steps": 4}))
        done = cell / "attacks" / "inversion" / "attack.json"
        done.write_text(json.dumps({"attack": "inversion", "rouge_l_f1": 0.5, "seconds": 1.0}))
        if not fresh:
            os.utime(done, (since - 60, since - 60))
    _track_grid(tmp_path, {"settings": [{"name": "none"}, {"name": "gaussian"}], "attacks": ["inversion"]}, since)
    acc = event_accumulator.EventAccumulator(str(tmp_path / "cells" / "none" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("attack/inversion/rouge_l_f1")] == [(4, 0.5)]
    assert not (tmp_path / "cells" / "gaussian" / "tensorboard").exists()  # the twin: reused scores stay where they were


def test_wandb_is_offline_unless_logged_in(tmp_path, monkeypatch):
    from splittune.track.wandb import logged_in

    offline_env(monkeypatch, tmp_path)
    assert not logged_in()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    assert logged_in()  # the twin: a netrc entry is a login
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "abc123")
    assert logged_in()
    monkeypatch.setenv("WANDB_MODE", "ofline")
    with pytest.raises(TrackingError, match="WANDB_MODE='ofline' is not one of online, offline, disabled"):
        open_trackers(["wandb"], tmp_path, False)


@pytest.mark.parametrize("backend, module, package", [("mlflow", "mlflow", "mlflow-skinny"), ("wandb", "wandb", "wandb")])
def test_a_missing_library_is_one_error_naming_the_extra(tmp_path, monkeypatch, backend, module, package):
    import builtins

    real = builtins.__import__

    def without(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named '{module}'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(TrackingError, match=rf"report_to: {backend} needs the {package} package: pip install 'splittune\[tracking\]'"):
        open_trackers(["tensorboard", backend], tmp_path, False)
    assert not (tmp_path / RECORD).exists()  # the tracker opened before it is closed and forgotten


def test_splittune_train_says_it_in_one_error_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def without(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    sets = [a for s in tiny("train.steps=1", "report_to=wandb") for a in ("--set", s)]
    result = CliRunner().invoke(app, ["train", *sets, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: report_to: wandb needs the wandb package: pip install 'splittune[tracking]'"]


def test_the_adapter_directory_name_is_the_runs():
    from splittune.run.adapters import ADAPTERS
    from splittune.track import ADAPTERS as TRACKED

    assert TRACKED == ADAPTERS
