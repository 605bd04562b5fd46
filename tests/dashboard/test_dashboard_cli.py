"""``splittune dashboard`` and ``serve --dashboard`` from the command line: one ``error:`` line for what cannot work (a
folder that is no run, an address off loopback without a token, a port in use), checked before a model loads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request

import pytest
from typer.testing import CliRunner

from splittune.cli import app
from splittune.track.dashboard.http import TOKEN_ENV

from served import CLI


def cli(*args, env=None):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400", TOKEN_ENV: "", **(env or {})})
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "config.yaml").write_text("model: tiny:llama\ntrain: {steps: 2}\n")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "client": 0, "loss": 3.0, "bytes_up": 10, "bytes_down": 20}) + "\n")
    return tmp_path


def test_a_folder_that_is_not_a_run_is_one_error_line(tmp_path):
    code, out = cli("dashboard", tmp_path)
    assert code == 2 and out == f"error: {tmp_path} is not a run directory (no config.yaml): give the --out of a `splittune train`"
    code, out = cli("dashboard", tmp_path / "absent")
    assert code == 2 and out == f"error: {tmp_path / 'absent'}: no such run directory"


def test_off_loopback_without_a_token_is_refused(run_dir, tmp_path):
    code, out = cli("dashboard", run_dir, "--listen", "0.0.0.0:0")
    assert code == 2 and out.startswith("error: --listen 0.0.0.0:0: a dashboard off loopback needs a token"), out
    (tmp_path / "short").write_text("abc")
    code, out = cli("dashboard", run_dir, "--listen", "0.0.0.0:0", "--token-file", tmp_path / "short")
    assert code == 2 and "at least 16 characters" in out and "abc" not in out, out  # (a token is never echoed)
    code, out = cli("dashboard", run_dir, "--listen", "nowhere")
    assert code == 2 and out.startswith("error: --listen must be HOST:PORT"), out


def test_a_port_in_use_is_one_error_line(run_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = cli("dashboard", run_dir, "--listen", f"127.0.0.1:{port}")
    assert code == 2 and out == f"error: --listen 127.0.0.1:{port}: cannot listen there: the port is already in use", out


def test_serve_refuses_an_unguarded_operator_page_before_it_loads_a_model():
    code, out = cli("serve", "--model", "tiny:llama", "--listen", "127.0.0.1:0", "--dashboard", "0.0.0.0:0")
    assert code == 2 and out.startswith("error: --dashboard 0.0.0.0:0: a dashboard off loopback needs a token"), out


def test_the_command_serves_the_run_until_stopped(run_dir, tmp_path):
    log = tmp_path / "stderr"
    proc = subprocess.Popen([*CLI, "dashboard", str(run_dir), "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=open(log, "w"), text=True, env={**os.environ, "COLUMNS": "60"})  # (a long line stays one)
    try:
        first = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in first, first + log.read_text()
        url = first.split("listening on ")[1].split()[0]
        with urllib.request.urlopen(url + "api/run", timeout=10) as reply:
            state = json.loads(reply.read())
        assert state["step"] == 1 and state["steps"] == 2 and state["status"] == "stopped" and state["bytes_down"] == 20
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
