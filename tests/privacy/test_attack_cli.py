"""`splittune train --record-tap`, `splittune attack` and `splittune leak` from the command line: files written, and
one clear `error:` line for a run without a tap, an attack that does not fit, an unknown attack or option."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from served import CLI
from splittune.cli import app

runner = CliRunner()
MODEL = "tiny:llama,layers=3,hidden=32,heads=2,kv_heads=1,ffn=64"
SETS = ["--set", f"model={MODEL}", "--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.seq_len=16",
        "--set", "train.warmup_steps=0", "--set", "data.max_train_examples=8", "--set", "data.max_eval_examples=2",
        "--set", "train.eval_batches=1"]


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output
    return " ".join(lines[lines.index(next(line for line in lines if line.startswith("error: "))):])


@pytest.fixture(scope="module")
def two_part(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(app, ["train", *SETS, "--set", "cuts=[1]", "--out", str(out), "--record-tap", "server"])
    assert result.exit_code == 0, result.output
    return out


def test_attack_writes_its_json_and_page(two_part, tmp_path):
    result = runner.invoke(app, ["attack", str(two_part), "--attack", "inversion", "--set", "epochs=2", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "attack.json").read_text())
    assert report["attack"] == "inversion" and report["aux"] == "builtin:sentiment"  # not the run's own text
    assert 0.0 <= report["rouge_l_f1"] <= 1.0 and 0.0 <= report["token_accuracy"] <= 1.0 and report["per_step"]
    page = (tmp_path / "a" / "attack.html").read_text()
    assert "<table" in page and 'class="hit"' in page and "<script" not in page


def test_attack_errors_name_what_is_missing(two_part, tmp_path):
    assert "no server tap (it has no tap)" in _error(runner.invoke(app, ["attack", str(tmp_path), "--attack", "inversion"]))
    assert "--record-tap server" in _error(runner.invoke(app, ["attack", str(tmp_path), "--attack", "inversion"]))
    assert "needs a u-shape split; this run is two-part" in _error(runner.invoke(app, ["attack", str(two_part), "--attack", "gradient-labels"]))
    assert "no aggregator tap (it has the server tap)" in _error(runner.invoke(app, ["attack", str(two_part), "--attack", "aggregator"]))
    assert "unknown attack 'nope'; attacks: inversion" in _error(runner.invoke(app, ["attack", str(two_part), "--attack", "nope"]))
    assert "unknown option 'bogus'" in _error(runner.invoke(app, ["attack", str(two_part), "--attack", "inversion", "--set", "bogus=1"]))
    assert "is the run's private data" in _error(runner.invoke(app, ["attack", str(two_part), "--attack", "inversion", "--aux",
                                                                     "builtin:shakespeare"]))


def test_record_tap_errors(tmp_path):
    assert "observers from server, aggregator, eavesdropper" in _error(
        runner.invoke(app, ["train", *SETS, "--out", str(tmp_path / "a"), "--record-tap", "client"]))
    assert "mode: centralized has no cut" in _error(
        runner.invoke(app, ["train", *SETS, "--set", "mode=centralized", "--out", str(tmp_path / "b"), "--record-tap", "server"]))
    assert "serve --record-tap" in _error(
        runner.invoke(app, ["train", *SETS, "--server", "grpc://127.0.0.1:1", "--out", str(tmp_path / "c"), "--record-tap", "server"]))


def test_leak_sweeps_cuts_and_plots(tmp_path):
    out = tmp_path / "leak"
    result = runner.invoke(app, ["leak", "--model", MODEL, "--cuts", "0,1,7", "--attack", "inversion", "--codec", "raw,int8",
                                 "--data", "builtin:shakespeare", "--out", str(out), "--set", "train.seq_len=16"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "leak.json").read_text())
    assert report["cuts"] == [0, 1]  # 7 is past the model's 3 blocks: dropped
    assert {(p["codec"], p["cut"]) for p in report["points"]} == {("raw", 0), ("raw", 1), ("int8", 0), ("int8", 1)}
    assert (out / "leak.png").stat().st_size > 1000
    mtime = (out / "cells" / "raw-cut0" / "attacks" / "inversion" / "attack.json").stat().st_mtime
    again = runner.invoke(app, ["leak", "--model", MODEL, "--cuts", "0", "--attack", "inversion", "--data", "builtin:shakespeare",
                                "--out", str(out), "--set", "train.seq_len=16"])
    assert again.exit_code == 0, again.output
    assert (out / "cells" / "raw-cut0" / "attacks" / "inversion" / "attack.json").stat().st_mtime == mtime  # a finished cell is kept
    assert "--attack aggregator reads the aggregator's tap" in _error(runner.invoke(app, ["leak", "--model", MODEL, "--attack", "aggregator"]))


def test_the_leak_plot_ticks_whole_cuts(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from splittune.privacy.leak import plot

    seen = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: seen.append([t for ax in fig.axes for t in ax.get_xticks()]))
    points = [{"attack": "inversion", "codec": "raw", "cut": c, "rouge_l_f1": 0.9 - 0.1 * c, "token_accuracy": 0.8 - 0.1 * c}
              for c in (1, 2, 3)]
    plot({"attacks": ["inversion"], "codecs": ["raw"], "points": points, "model": "m", "data": "d"}, tmp_path / "leak.png")
    assert seen and all(float(t).is_integer() for t in seen[0])


def test_a_run_without_a_tap_is_told_a_command_that_records_one(tmp_path):
    from splittune.privacy.job import tap_folder
    from splittune.taps.tap import TapError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: tiny:llama\n")
    with pytest.raises(TapError, match=r"--config .*run/config.yaml --record-tap server --out .*run-server-tap` \(the same run"):
        tap_folder(tmp_path / "run", "server")


def test_ctrl_c_and_sigterm_stop_an_attack_at_once_with_one_line(two_part, tmp_path):
    """A long attack (many epochs) stops within seconds of SIGINT or SIGTERM: exit 130, one line, no traceback, and
    no half-written report."""
    import os
    import signal
    import subprocess
    import time

    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        proc = subprocess.Popen([*CLI, "attack", str(two_part), "--attack", "inversion",
                                 "--set", "epochs=100000", "--out", str(out)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
        for line in proc.stdout:  # the first progress line: the attack is training its inverter
            if "training the inverter" in line:
                break
        sent = time.monotonic()
        proc.send_signal(sig)
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 130
        assert time.monotonic() - sent < 20, f"{sig.name}: took {time.monotonic() - sent:.0f} s to stop"
        assert "stopped: the attack was interrupted; nothing was written" in rest and "Traceback" not in rest
        assert not (out / "attack.json").exists()
