"""--quiet, --verbose and --log-format json: what a script or a log collector reads from splittune."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from splittune.cli import app

from configs import tiny

runner = CliRunner()
TRAIN = ["train", *[a for s in tiny("cuts=[1,3]", "train.steps=2", "data.max_documents=4") for a in ("--set", s)]]


def test_json_lines_for_progress_results_warnings_and_errors(tmp_path):
    result = runner.invoke(app, ["--log-format", "json", *TRAIN, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]  # every line is JSON: no rich text in between
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds.count("step") == 2 and kinds[-1] == "summary"
    assert events[-1]["steps"] == 2 and events[-1]["run"] == str(tmp_path / "run") and "loss" in events[kinds.index("step")]
    warnings = [json.loads(line) for line in result.stderr.splitlines()]
    assert warnings and all(w["level"] == "warning" for w in warnings) and "warmup_steps" in warnings[0]["message"]
    bad = runner.invoke(app, ["--log-format", "json", "train", "--set", "steps=3"])
    assert bad.exit_code == 2 and json.loads(bad.stderr.strip()) == {
        "level": "error", "message": json.loads(bad.stderr.strip())["message"]}
    assert "did you mean 'train.steps'" in json.loads(bad.stderr.strip())["message"] and bad.stdout == ""
    text = runner.invoke(app, [*TRAIN, "--out", str(tmp_path / "text")])  # the twin: the default is text for people
    assert text.exit_code == 0 and "run directory:" in text.stdout and not text.stdout.lstrip().startswith("{")


def test_quiet_prints_only_warnings_and_errors(tmp_path):
    result = runner.invoke(app, ["--quiet", *TRAIN, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0 and result.stdout == "" and "warning: train.warmup_steps" in result.stderr
    assert (tmp_path / "run" / "summary.json").exists()
    bad = runner.invoke(app, ["--quiet", "train", "--set", "steps=3"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: unknown config key 'steps'")
    assert runner.invoke(app, ["--log-format", "yaml", "models"]).stderr.startswith("error: --log-format 'yaml': the formats are")


def test_verbose_keeps_the_libraries_logs():
    import transformers

    runner.invoke(app, ["models"])
    assert transformers.utils.logging.get_verbosity() == transformers.logging.ERROR  # the default quiets them
    runner.invoke(app, ["--verbose", "models"])
    assert transformers.utils.logging.get_verbosity() == transformers.logging.INFO
    runner.invoke(app, ["models"])  # and the next invocation is quiet again
    assert transformers.utils.logging.get_verbosity() == transformers.logging.ERROR
