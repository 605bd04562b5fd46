"""Every client process ends: whatever stops a client (a refused token or hello, TLS, a server that died or went
silent, Ctrl-C, a failure inside a stage), it prints its line and exits with a non-zero status within seconds.

grpcio waits forever in a call's ``__del__`` at interpreter exit when a channel was left to the garbage collector
(seen with a refused token: 24 minutes until killed), so these run the real command in a process of its own.
"""

import signal
import subprocess
import sys
import threading
import time

import pytest

from served import CLI, Served, sets
from configs import tiny

RUN = tiny("cuts=[1,3]", "data.max_documents=6", "train.eval_every=0", "train.warmup_steps=0")
EXIT_S = 10.0  # from the last line to the exit: closing channels takes well under a second


class Ended:
    """A command run to its end, with the time between its last output line and its exit."""

    def __init__(self, args: list[str], after=None, timeout_s: float = 180.0):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.last_line_at = time.monotonic()

        def read():
            for line in proc.stdout:
                self.lines.append(line)
                self.last_line_at = time.monotonic()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if after is not None:
            after(proc, self)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the client did not exit within {timeout_s} s:\n{self.text}")
        self.exited_at = time.monotonic()
        reader.join(5)
        self.returncode = proc.returncode

    @property
    def text(self) -> str:
        return "".join(self.lines)

    @property
    def linger_s(self) -> float:
        return self.exited_at - self.last_line_at

    def assert_ended(self, *, code: int = 2, says: str = "error:", exit_s: float = EXIT_S) -> None:
        assert self.returncode == code, self.text
        assert says in self.text, self.text
        assert self.linger_s < exit_s, f"exited {self.linger_s:.1f} s after its last line:\n{self.text}"


def steps_written(out) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def when_training(out, then, steps: int = 2):
    """``after``: once ``steps`` steps are in the run's metrics, ``then(proc)``."""

    def after(proc, ended):
        deadline = time.monotonic() + 120
        while steps_written(out) < steps and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, ended.text
        then(proc)

    return after


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server that wants tokens (alice's is known), shared by the refusals."""
    from splittune.deploy.certs import make_certs

    pki = tmp_path_factory.mktemp("pki")
    make_certs(pki, ["localhost"], ["alice"])
    server = Served(pki / "serve.log", "--tokens", str(pki / "tokens.yaml"))
    yield server, pki
    server.stop()


def test_a_refused_token_ends_the_client(guarded, tmp_path):
    server, _ = guarded
    (tmp_path / "wrong.token").write_text("not-alices-token-at-all-0123")
    (tmp_path / "wrong.token").chmod(0o600)
    ended = Ended([*CLI, "train", *sets([*RUN, "train.steps=2"]), "--server", server.url, "--client-id", "alice",
                   "--token-file", str(tmp_path / "wrong.token"), "--out", str(tmp_path / "run")])
    ended.assert_ended(says="error: client 'alice' did not present a valid token")


def test_a_refused_token_ends_generation(guarded, tmp_path):
    from splittune.run import train
    from splittune.config import load_config

    server, _ = guarded
    train(load_config(None, [*RUN, "train.steps=1"]), tmp_path / "run")
    (tmp_path / "wrong.token").write_text("not-alices-token-at-all-0123")
    (tmp_path / "wrong.token").chmod(0o600)
    ended = Ended([*CLI, "generate", str(tmp_path / "run"), "--prompt", "To be", "--max-new-tokens", "2",
                   "--server", server.url, "--client-id", "alice", "--token-file", str(tmp_path / "wrong.token")])
    ended.assert_ended(says="error: client 'alice' did not present a valid token")


def test_a_refused_hello_ends_the_client(guarded, tmp_path):
    server, pki = guarded  # the server holds tiny:llama; this client's run is of another model
    ended = Ended([*CLI, "train", *sets([*RUN, "train.steps=2", "model=tiny:qwen2"]), "--server", server.url,
                   "--client-id", "alice", "--token-file", str(pki / "alice.token"), "--out", str(tmp_path / "run")])
    ended.assert_ended(says="error:")
    assert "model" in ended.text.split("error:", 1)[1], ended.text


def test_a_tls_failure_ends_the_client(guarded, tmp_path):
    server, pki = guarded  # grpcs:// to a plaintext server
    url = server.url.replace("grpc://", "grpcs://").replace("127.0.0.1", "localhost")
    ended = Ended([*CLI, "train", *sets([*RUN, "train.steps=2"]), "--server", url, "--tls-ca", str(pki / "ca.pem"),
                   "--client-id", "alice", "--token-file", str(pki / "alice.token"), "--out", str(tmp_path / "run")])
    ended.assert_ended(says="error: cannot connect")


def test_a_server_that_died_ends_the_client(tmp_path):
    server = Served(tmp_path / "serve.log")
    out = tmp_path / "run"
    try:
        ended = Ended([*CLI, "train", *sets([*RUN, "train.steps=400"]), "--server", server.url, "--out", str(out)],
                      after=when_training(out, lambda proc: server.proc.kill()))
    finally:
        server.stop()
    ended.assert_ended(says="error: the connection to the server was lost")


def test_a_server_that_went_silent_ends_the_client(tmp_path):
    server = Served(tmp_path / "serve.log")
    out = tmp_path / "run"
    try:
        ended = Ended([*CLI, "train", *sets([*RUN, "train.steps=400"]), "--server", server.url, "--reply-timeout", "2",
                       "--out", str(out)], after=when_training(out, lambda proc: server.proc.send_signal(signal.SIGSTOP)))
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()
    ended.assert_ended(says="within 2 s")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A server shared by the endings that leave it serving (Ctrl-C, a failure in the client's stage)."""
    server = Served(tmp_path_factory.mktemp("plain") / "serve.log")
    yield server
    server.stop()


def test_ctrl_c_ends_the_client(plain, tmp_path):
    out = tmp_path / "run"
    ended = Ended([*CLI, "train", *sets([*RUN, "train.steps=400"]), "--server", plain.url, "--out", str(out)],
                  after=when_training(out, lambda proc: proc.send_signal(signal.SIGINT)))
    ended.assert_ended(code=130, says="run the same command to resume")


FAILING_EMBEDDING = """
import sys, torch
calls = [0]
forward = torch.nn.Embedding.forward
def failing(self, x):
    calls[0] += 1
    if calls[0] > 3:
        raise RuntimeError("injected failure")
    return forward(self, x)
torch.nn.Embedding.forward = failing
from splittune.cli import app
sys.argv = ["splittune", *sys.argv[1:]]
app()
"""


def test_a_failure_inside_a_stage_ends_the_client(plain, tmp_path):
    ended = Ended([sys.executable, "-c", FAILING_EMBEDDING, "train", *sets([*RUN, "train.steps=20"]),
                   "--server", plain.url, "--out", str(tmp_path / "run")])
    ended.assert_ended(says="forward (")
    assert "failed: RuntimeError: injected failure" in ended.text


def test_the_exit_bound_can_fail(tmp_path):
    """The twin: a process that lingers after its last line is caught."""
    ended = Ended([sys.executable, "-c", "import time; print('error: x', flush=True); time.sleep(2); raise SystemExit(2)"])
    ended.assert_ended(exit_s=5)
    with pytest.raises(AssertionError, match=r"exited 2\.\d s after its last line"):
        ended.assert_ended(exit_s=1)
