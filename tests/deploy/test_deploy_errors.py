"""A newcomer's first hour with a deployment: each mistake (a missing CA, the wrong scheme, a certificate
without its key, someone else's certificate, a busy port, a server that vanished, another model) is told
in one line, within seconds; and each check's twin shows that the right setup still works."""

import socket
import time

import pytest
import yaml
from typer.testing import CliRunner

from splittune.channels import RemoteError
from splittune.channels.base import ConnectionLost
from splittune.channels.grpc import GrpcChannel
from splittune.config import load_config
from splittune.deploy.certs import make_certs
from splittune.deploy.files import check_client, check_server
from splittune.deploy.service import SplitService, Tls, bind, release, start
from splittune.channels.transport import DeployError, parse_listen
from splittune.models.arch import detect_arch
from splittune.models.zoo import resolve_model
from splittune.parties import SessionSpec
from splittune.parties.server.handler import Server
from splittune.run import train_remote
from splittune.wire import Message
from served import free_port, serve_here
from test_deploy import RUN, _hello

from splittune.cli import app

FAST = 10  # seconds: a refusal that takes longer is the old 30 s wait


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    make_certs(folder, ["localhost", "127.0.0.1"], ["alice", "bob"])
    other = folder / "other"
    make_certs(other, ["localhost", "127.0.0.1"], ["eve"])  # another CA
    (folder / "garbage.pem").write_text("this is not a certificate\n")
    return folder


@pytest.fixture(scope="module")
def tokens(pki):
    return yaml.safe_load((pki / "tokens.yaml").read_text())


def _party_server(source, **kwargs) -> Server:
    from splittune.schedules.policy import POLICIES

    return Server(source, detect_arch(source.config()), source.config(), policies=POLICIES, **kwargs)


def _server(tokens=None, tls=None, state_dir=None, model="tiny:llama", port=None):
    source = resolve_model(model)
    service = SplitService(_party_server(source, wait_s=30, state_dir=state_dir), tokens)
    if port is None:
        return serve_here(service, tls)
    return start(service, parse_listen(f"127.0.0.1:{port}"), tls), port


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    return result.exit_code, " ".join(result.output.split())


# -- 1. mutual TLS binds the client id to the certificate ----------------------------------------------------

def test_mutual_tls_binds_the_client_id_to_the_certificate(pki, tokens):
    server, port = _server(tokens, Tls(pki / "server.pem", pki / "server.key", pki / "ca.pem"))
    url = f"grpcs://localhost:{port}"
    bob_cert = dict(ca=pki / "ca.pem", cert=pki / "bob.pem", key=pki / "bob.key")
    try:
        with pytest.raises(RemoteError) as err:  # bob's certificate, alice's id and token
            _hello(GrpcChannel(url, client_id="alice", token=tokens["alice"], **bob_cert))
        assert err.value.code == "PERMISSION_DENIED"
        assert "the client certificate is for 'bob', but the session claims client id 'alice'" in str(err.value)
        # the twin: bob's certificate with bob's own id and token
        assert _hello(GrpcChannel(url, client_id="bob", token=tokens["bob"], **bob_cert)).meta["accepted"]
    finally:
        server.stop(None)


def test_mutual_tls_without_tokens_takes_the_certificates_name(pki):
    server, port = _server(None, Tls(pki / "server.pem", pki / "server.key", pki / "ca.pem"))
    url = f"grpcs://localhost:{port}"
    bob_cert = dict(ca=pki / "ca.pem", cert=pki / "bob.pem", key=pki / "bob.key")
    try:
        with pytest.raises(RemoteError) as err:
            _hello(GrpcChannel(url, client_id="alice", **bob_cert))
        assert err.value.code == "PERMISSION_DENIED" and "'bob'" in str(err.value) and "'alice'" in str(err.value)
        assert _hello(GrpcChannel(url, **bob_cert)).meta["accepted"]  # no id claimed: the certificate's
    finally:
        server.stop(None)


# -- 2. connection failures tell their cause within seconds --------------------------------------------------

def _refusal(url, **kwargs):
    started = time.monotonic()
    with pytest.raises(RemoteError) as err:
        GrpcChannel(url, **kwargs)
    took = time.monotonic() - started
    assert took < FAST, f"{took:.1f} s: {err.value}"
    assert err.value.code == "UNAVAILABLE"
    return str(err.value)


def test_tls_failures_name_their_cause_within_seconds(pki):
    tls, port = _server(None, Tls(pki / "server.pem", pki / "server.key"))
    mutual, mport = _server(None, Tls(pki / "server.pem", pki / "server.key", pki / "ca.pem"))
    plain, pport = _server()
    try:
        assert "certificate verification failed: the server's certificate is not signed by a CA this client trusts; pass --tls-ca" \
            in _refusal(f"grpcs://localhost:{port}")
        assert f"is not signed by the CA in --tls-ca {pki / 'other' / 'ca.pem'}" in _refusal(f"grpcs://localhost:{port}", ca=pki / "other" / "ca.pem")
        assert f"the server speaks TLS; use grpcs://127.0.0.1:{port}" in _refusal(f"grpc://127.0.0.1:{port}")
        assert "the server does not speak TLS" in _refusal(f"grpcs://localhost:{pport}", ca=pki / "ca.pem")
        assert "the server requires a client certificate (mutual TLS); pass --tls-cert and --tls-key" \
            in _refusal(f"grpcs://localhost:{mport}", ca=pki / "ca.pem")
        assert "the server refused this client's certificate" in _refusal(
            f"grpcs://localhost:{mport}", ca=pki / "ca.pem", cert=pki / "other" / "eve.pem", key=pki / "other" / "eve.key")
        free = free_port()
        assert f"nothing listens at 127.0.0.1:{free}" in _refusal(f"grpc://127.0.0.1:{free}")
        # the twins: the right scheme and files connect
        GrpcChannel(f"grpcs://localhost:{port}", ca=pki / "ca.pem").close()
        GrpcChannel(f"grpcs://localhost:{mport}", ca=pki / "ca.pem", cert=pki / "alice.pem", key=pki / "alice.key").close()
        GrpcChannel(f"grpc://127.0.0.1:{pport}").close()
    finally:
        for s in (tls, mutual, plain):
            s.stop(None)


def test_health_gives_the_same_diagnosis(pki):
    server, port = _server(None, Tls(pki / "server.pem", pki / "server.key"))
    try:
        started = time.monotonic()
        code, out = cli("health", "--server", f"grpcs://localhost:{port}")
        assert code == 2 and "does not answer: certificate verification failed" in out and "pass --tls-ca" in out
        code, out = cli("health", "--server", f"grpc://127.0.0.1:{port}")
        assert code == 2 and "the server speaks TLS; use grpcs://" in out
        assert time.monotonic() - started < FAST
        code, out = cli("health", "--server", f"grpcs://localhost:{port}", "--tls-ca", pki / "ca.pem")
        assert code == 0 and "SERVING" in out, out
    finally:
        server.stop(None)


# -- 3. flags and files are checked before anything starts ----------------------------------------------------

def test_client_flag_and_file_refusals(pki, tmp_path):
    url = f"grpcs://localhost:{free_port()}"
    train = ["train", *[a for s in RUN for a in ("--set", s)], "--server", url, "--out", tmp_path / "run"]
    for command in (train, ["health", "--server", url]):
        code, out = cli(*command, "--tls-cert", pki / "alice.pem")
        assert code == 2 and "error: --tls-cert needs --tls-key too" in out, out
        code, out = cli(*command, "--tls-key", pki / "alice.key")
        assert code == 2 and "error: --tls-key needs --tls-cert too" in out, out
        code, out = cli(*command, "--tls-ca", tmp_path / "nope.pem")
        assert code == 2 and f"error: --tls-ca {tmp_path / 'nope.pem'}: no such file" in out, out
        code, out = cli(*command, "--tls-ca", pki / "garbage.pem")
        assert code == 2 and f"--tls-ca {pki / 'garbage.pem'} is not a PEM certificate" in out, out
        code, out = cli(*command, "--tls-cert", pki / "alice.pem", "--tls-key", pki / "bob.key")
        assert code == 2 and "--tls-key" in out and "is not the key of --tls-cert" in out, out
        code, out = cli(*command, "--tls-cert", pki / "alice.pem", "--tls-key", pki / "alice.pem")
        assert code == 2 and "is not a PEM private key" in out, out
    code, out = cli(*train, "--token-file", tmp_path / "alice.token")
    assert code == 2 and f"error: --token-file {tmp_path / 'alice.token'}: no such file" in out, out
    assert not (tmp_path / "run").exists()
    # the twins: good files pass the same checks
    check_client(pki / "ca.pem", pki / "alice.pem", pki / "alice.key")
    check_client(None, None, None)
    check_server(pki / "server.pem", pki / "server.key", pki / "ca.pem")


# -- 4. serve checks its certificate and binds its port before it loads the model ---------------------------------

@pytest.fixture
def model_loads(monkeypatch):
    """Records whether ``serve`` got as far as loading its model (and stops it there)."""
    import splittune.models.zoo as zoo

    calls = []

    def resolve(ref):
        calls.append(ref)
        raise zoo.ModelError(f"stopped before loading {ref}")

    monkeypatch.setattr(zoo, "resolve_model", resolve)
    return calls


def test_serve_fails_fast_on_a_bad_certificate_or_a_busy_port(pki, model_loads):
    port = free_port()
    serve = ["serve", "--model", "tiny:gpt2", "--listen", f"127.0.0.1:{port}"]
    code, out = cli(*serve, "--tls-cert", pki / "garbage.pem", "--tls-key", pki / "server.key")
    assert code == 2 and "--tls-cert" in out and "is not a PEM certificate" in out, out
    code, out = cli(*serve, "--tls-cert", pki / "server.pem", "--tls-key", pki / "alice.key")
    assert code == 2 and "is not the key of --tls-cert" in out, out
    code, out = cli(*serve, "--tls-cert", pki / "server.pem")
    assert code == 2 and "--tls-cert needs --tls-key too" in out, out
    code, out = cli(*serve, "--tls-cert", pki / "server.pem", "--tls-key", pki / "server.key", "--tls-client-ca", pki / "none.pem")
    assert code == 2 and "--tls-client-ca" in out and "no such file" in out, out
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        code, out = cli(*serve)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}: the port is already in use" in out, out
    assert model_loads == []
    # the twin: good files and a free port get as far as the model, and give the port back on the way out
    code, out = cli(*serve, "--tls-cert", pki / "server.pem", "--tls-key", pki / "server.key", "--tls-client-ca", pki / "ca.pem")
    assert code == 2 and "stopped before loading tiny:gpt2" in out and model_loads == ["tiny:gpt2"], out
    release(bind(parse_listen(f"127.0.0.1:{port}"), None)[0])


def test_bind_refuses_what_it_cannot_serve(pki):
    with pytest.raises(DeployError, match="is not a PEM certificate"):
        bind(parse_listen(f"127.0.0.1:{free_port()}"), Tls(pki / "garbage.pem", pki / "server.key"))
    release(bind(parse_listen(f"127.0.0.1:{free_port()}"), Tls(pki / "server.pem", pki / "server.key"))[0])


# -- 5. a server that vanishes mid-run --------------------------------------------------------------------------

def test_a_vanished_server_says_where_the_run_stopped_and_how_to_resume(tmp_path):
    cfg = load_config(None, [*RUN, "train.steps=4", "train.checkpoint_every=1"])
    state = tmp_path / "state"
    server, port = _server(state_dir=state)
    url = f"grpc://127.0.0.1:{port}"

    def vanish_after(step):
        def progress(done, total, row):
            if row.get("step") == step:
                server.stop(None)
        return progress

    with pytest.raises(ConnectionLost) as err:
        train_remote(cfg, tmp_path / "run", 0, lambda i: GrpcChannel(url), vanish_after(2))
    text = str(err.value)
    assert "the connection to the server was lost at step 3" in text and "resumes from the checkpoint at step 1" in text, text
    # the twin: the server back with its state, the same command resumes and finishes
    server, _ = _server(state_dir=state, port=port)
    try:
        summary = train_remote(cfg, tmp_path / "run", 0, lambda i: GrpcChannel(url))
        assert summary["steps"] == 4
    finally:
        server.stop(None)


def test_a_vanished_server_without_state_says_the_run_starts_again(tmp_path):
    cfg = load_config(None, [*RUN, "train.steps=3"])
    server, port = _server()

    def progress(done, total, row):
        if row.get("step") == 1:
            server.stop(None)

    with pytest.raises(ConnectionLost) as err:
        train_remote(cfg, tmp_path / "run", 0, lambda i: GrpcChannel(f"grpc://127.0.0.1:{port}"), progress)
    text = str(err.value)
    assert "lost at step 2" in text and "no checkpoint yet: the server needs --state DIR" in text and "starts from the start" in text, text


def test_train_cli_reports_a_vanished_server_in_one_line(tmp_path):
    import threading

    server, port = _server()
    metrics = tmp_path / "run" / "metrics.jsonl"

    def vanish():
        deadline = time.monotonic() + 60
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        server.stop(None)

    threading.Thread(target=vanish, daemon=True).start()
    code, out = cli("train", *[a for s in [*RUN, "train.steps=20"] for a in ("--set", s)], "--server", f"grpc://127.0.0.1:{port}",
                    "--out", tmp_path / "run")
    assert code == 2 and "error: the connection to the server was lost at step" in out and "no checkpoint yet" in out, out
    assert "Traceback" not in out


# -- 6. a model mismatch names both models ------------------------------------------------------------------------

def test_a_model_mismatch_names_both_models():
    llama, gpt2 = resolve_model("tiny:llama"), resolve_model("tiny:gpt2")
    server = _party_server(llama, wait_s=5)
    cfg = load_config(None, [*RUN, "model=tiny:gpt2"])
    spec = SessionSpec.from_run(cfg, gpt2.fingerprint(), "gpt2", model=gpt2.describe())
    reply = server.handle(Message("hello", "s1", meta=spec.to_meta()))
    reason = reply.meta["reason"]
    assert reply.kind == "error" and reply.meta["code"] == "FAILED_PRECONDITION"
    assert "the client's base model tiny:gpt2 has fingerprint" in reason and f"the server's tiny:llama ({llama.path})" in reason, reason
    assert str(gpt2.path) not in reason  # the hello names the client's model, never where it keeps it
    assert gpt2.fingerprint() in reason and llama.fingerprint() in reason
    # the twin: the same weights from any path are the same model; the reference is not a shared term
    cfg = load_config(None, RUN)
    spec = SessionSpec.from_run(cfg, llama.fingerprint(), "llama", model="/elsewhere/llama")
    assert "model" not in spec.shared_terms()
    assert server.handle(Message("hello", "s2", meta=spec.to_meta())).meta["accepted"]
