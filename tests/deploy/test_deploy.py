"""Deployment over gRPC on loopback: separate server and client processes equal the in-process run;
TLS, mutual TLS and tokens; every kind of bad input gets its status and the server keeps serving."""

import json
import random
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from safetensors.torch import load_file

from splittune.channels import RemoteError
from splittune.channels.grpc import GrpcChannel
from splittune.config import load_config
from splittune.deploy.certs import make_certs
from splittune.deploy.service import Limits, SplitService, Tls, health, load_tokens
from splittune.channels.transport import LAST, SESSION_METHOD, DeployError, chunks, parse_server
from splittune.models.arch import detect_arch
from splittune.models.zoo import resolve_model
from splittune.parties import SessionSpec
from splittune.parties.server.handler import Server
from splittune.schedules.policy import POLICIES
from splittune.taps.tap import Tap
from splittune.run import train
from splittune.wire import FrameLimits, Message, encode_frame

from served import CLI, Served, free_port, serve_here, sets
from configs import tiny

RUN = tiny("cuts=[1,3]", "train.steps=3", "data.max_documents=6", "train.lr=0.01", "train.warmup_steps=0")


@pytest.fixture
def serve_process(tmp_path):
    """``splittune serve`` in its own process; yields its URL."""
    served: list[Served] = []

    def launch(*extra, model="tiny:llama"):
        served.append(Served(tmp_path / f"serve-{len(served)}.log", *extra, model=model))
        return served[-1].url

    launch.procs = served
    yield launch
    for s in served:
        s.stop()


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def launch_clients(tmp_path, url, run, n):
    """``n`` client processes of ``run`` against the server at ``url``, each with its own --out."""
    return [subprocess.Popen([*CLI, "train", *sets(run), "--server", url, "--client-index", str(i), "--client-id", f"c{i}",
                              "--out", str(tmp_path / f"c{i}")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(n)]


def test_grpc_processes_equal_the_in_process_run(tmp_path, serve_process):
    url = serve_process("--record-tap", str(tmp_path / "audit"))
    remote = subprocess.run([*CLI, "train", *sets(RUN), "--server", url, "--out", str(tmp_path / "remote")],
                            capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stdout + remote.stderr
    train(load_config(None, RUN), tmp_path / "local", record_tap=("server",))
    got, want = rows(tmp_path / "remote"), rows(tmp_path / "local")
    for g, w in zip(got, want, strict=True):
        assert (g["loss"], g["bytes_up"], g["bytes_down"]) == (w["loss"], w["bytes_up"], w["bytes_down"])
    for part in ("client", "server"):
        a = load_file(tmp_path / f"remote/adapters/{part}.safetensors")
        b = load_file(tmp_path / f"local/adapters/{part}.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    status = health(url)
    assert status["status"] == "SERVING" and status["messages"] > 0
    assert status["peak_memory"]["rss_bytes"] > 100 * 2**20  # a process that holds torch and a model
    ledgers = [[{k: v for k, v in json.loads(line).items() if k != "session"} for line in (tmp_path / run / "sent.jsonl").read_text().splitlines()]
               for run in ("remote", "local")]
    steps = [[r for r in ledger if r["kind"] in ("activations", "gradients", "step")] for ledger in ledgers]
    assert steps[0] == steps[1] and steps[0]  # the client's ledger is the same on both channels
    serve_process.procs[0].stop()  # the operator's tap is complete once the server stops
    served, local = Tap.open(tmp_path / "audit" / "server"), Tap.open(tmp_path / "local" / "tap" / "server")
    for kind, direction in (("activations", "up"), ("gradients", "up"), ("activations", "down")):
        a, b = list(served.records(kind, direction)), list(local.records(kind, direction))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert (x.step, x.micro) == (y.step, y.micro)
            assert all(torch.equal(x.tensors()[k], y.tensors()[k]) for k in y.entries)


# -- TLS, tokens and refusals (a gRPC server in this process, real sockets) -------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    make_certs(folder, ["localhost", "127.0.0.1"], ["alice", "bob"])
    return folder


def _serve(tokens=None, tls=None, limits=None, insecure=False, host="127.0.0.1", bindings=None):
    source = resolve_model("tiny:llama")
    config = source.config()
    service = SplitService(Server(source, detect_arch(config), config, wait_s=30, policies=POLICIES), tokens, limits, bindings=bindings)
    server, port = serve_here(service, tls, insecure, host)
    return server, service, port


def _hello(channel, client=0):
    """A client's real session proposal for RUN."""
    from splittune.parties import SessionSpec

    cfg = load_config(None, RUN)
    source = resolve_model(cfg.model)
    spec = SessionSpec.from_run(cfg, source.fingerprint(), "llama", client, 10)
    return channel.call(Message("hello", f"session-{random.random()}", meta=spec.to_meta()))


def test_tls_tokens_and_mutual_tls(pki):
    tokens = {k: v.strip() for k, v in __import__("yaml").safe_load((pki / "tokens.yaml").read_text()).items()}
    server, _, port = _serve(tokens, Tls(pki / "server.pem", pki / "server.key", pki / "ca.pem"))
    url = f"grpcs://localhost:{port}"
    try:
        alice = dict(client_id="alice", token=tokens["alice"], ca=pki / "ca.pem", cert=pki / "alice.pem", key=pki / "alice.key")
        reply = _hello(GrpcChannel(url, **alice))
        assert reply.meta["accepted"]
        with pytest.raises(RemoteError) as err:  # no token
            _hello(GrpcChannel(url, **{**alice, "token": None}))
        assert err.value.code == "UNAUTHENTICATED" and "did not present a valid token" in str(err.value)
        with pytest.raises(RemoteError) as err:  # alice's certificate, bob's name, alice's token
            _hello(GrpcChannel(url, **{**alice, "client_id": "bob"}))
        assert err.value.code == "UNAUTHENTICATED"
        with pytest.raises(RemoteError) as err:  # mutual TLS: no client certificate, no connection
            GrpcChannel(url, **{**alice, "cert": None, "key": None}, connect_timeout_s=3)
        assert err.value.code == "UNAVAILABLE"
        with pytest.raises(RemoteError) as err:  # plaintext to a TLS server
            GrpcChannel(f"grpc://127.0.0.1:{port}", connect_timeout_s=3)
        assert err.value.code == "UNAVAILABLE"
        # another client's session: bob may not touch alice's
        channel_a = GrpcChannel(url, **alice)
        session = "alice-session"
        from splittune.parties import SessionSpec

        cfg = load_config(None, RUN)
        spec = SessionSpec.from_run(cfg, resolve_model(cfg.model).fingerprint(), "llama", 0, 10)
        channel_a.call(Message("hello", session, meta=spec.to_meta()))
        bob = GrpcChannel(url, client_id="bob", token=tokens["bob"], ca=pki / "ca.pem", cert=pki / "bob.pem", key=pki / "bob.key")
        with pytest.raises(RemoteError) as err:
            bob.call(Message("state", session))
        assert err.value.code == "PERMISSION_DENIED" and "belongs to another client" in str(err.value)
        assert channel_a.call(Message("state", session)).kind == "state"  # alice still fine
    finally:
        server.stop(None)


def test_bad_input_gets_a_status_and_the_server_keeps_serving():
    server, _, port = _serve(limits=Limits(FrameLimits(max_frame_bytes=1 << 20), max_sessions=8))
    url = f"grpc://127.0.0.1:{port}"
    try:
        channel = GrpcChannel(url)
        hello = _hello(channel)
        session = hello.session
        good = torch.zeros(2, 8, 64)
        mask = torch.ones(2, 8, dtype=torch.long)
        bad = good.clone()
        bad[0, 0, 0] = float("nan")
        with pytest.raises(RemoteError) as err:
            channel.call(Message("activations", session, 1, 0, {"hidden": bad, "attention_mask": mask}, {"train": True}))
        assert err.value.code == "INVALID_ARGUMENT" and "NaN" in str(err.value)
        with pytest.raises(RemoteError) as err:
            channel.call(Message("gradients", session, 7, 0, {"grad": good}))
        assert err.value.code == "FAILED_PRECONDITION"
        with pytest.raises(RemoteError) as err:
            channel.call(Message("activations", session, 1, 0, {"hidden": good[..., :10], "attention_mask": mask}, {"train": True}))
        assert "expected [batch, seq, 64]" in str(err.value)
        # the same session still works after every refusal
        reply = channel.call(Message("activations", session, 1, 0, {"hidden": good, "attention_mask": mask}, {"train": True}))
        assert reply.tensors["hidden"].shape == good.shape
        with pytest.raises(RemoteError) as err:
            GrpcChannel(url).call(Message("state", "nobody"))
        assert err.value.code == "NOT_FOUND"
        with pytest.raises(RemoteError) as err:  # 2 MiB frame against a 1 MiB limit
            GrpcChannel(url).call(Message("hello", "x", tensors={"junk": torch.zeros(1 << 19)}))
        assert err.value.code == "RESOURCE_EXHAUSTED"
        raw = grpc.insecure_channel(f"127.0.0.1:{port}").stream_stream(SESSION_METHOD, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            list(raw(iter([bytes([LAST]) + bytes(4) + b"STN1 garbage"])))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed frame" in err.value.details()
        assert health(url)["refused"] >= 3
    finally:
        server.stop(None)


def test_fuzzed_frames_do_not_stop_a_well_behaved_client(tmp_path, mutate):
    """Thousands of random and mutated frames, then a normal run on the same server."""
    server, service, port = _serve(limits=Limits(FrameLimits(max_frame_bytes=1 << 20), max_sessions=4096))
    target = f"127.0.0.1:{port}"
    rng = random.Random(0)
    try:
        stub = grpc.insecure_channel(target).stream_stream(SESSION_METHOD, request_serializer=None, response_deserializer=None)
        channel = GrpcChannel(f"grpc://{target}")
        session = _hello(channel).session
        templates = [
            encode_frame(Message("activations", session, 1, 0, {"hidden": torch.randn(2, 8, 64), "attention_mask": torch.ones(2, 8, dtype=torch.long)}, {"train": True})),
            encode_frame(Message("gradients", session, 1, 0, {"grad": torch.randn(2, 8, 64)})),
            encode_frame(Message("step", session, 1, 0, meta={"sq_norm": 1.0})),
            encode_frame(Message("aggregate", session, 0, 0, meta={"weight": 1})),
            # every lossy codec's parameters and payloads are fuzzed too
            *(encode_frame(Message("activations", session, 1, 0, {"hidden": torch.randn(2, 8, 64), "attention_mask": torch.ones(2, 8, dtype=torch.long)},
                                   {"train": True}), {"hidden": codec})
              for codec in ("fp16", "bf16", "int8", {"name": "int4", "group": 32}, {"name": "topk", "fraction": 0.2})),
        ]
        codes = {}
        for i in range(2000):
            frame = mutate(bytearray(rng.choice(templates)), rng, rng.randint(1, 8), 64)  # flip, cut or grow
            if i % 10 == 0:
                frame = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
            try:
                for reply in stub(iter(list(chunks(bytes(frame), 97)))):
                    pass
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as err:
                codes[err.code().name] = codes.get(err.code().name, 0) + 1
        assert codes.get("UNKNOWN", 0) == 0 and codes.get("INTERNAL", 0) == 0, codes
        assert codes.get("INVALID_ARGUMENT", 0) > 500
        channel.close()
        url = f"grpc://{target}"
        deadline = time.time() + 10
        while health(url)["sessions"]:  # live sessions: the fuzzing session ends, the server is free for a new run
            assert time.time() < deadline, health(url)
            time.sleep(0.05)
        assert health(url)["sessions_opened"] == 1
        from splittune.run import train_remote

        summary = train_remote(load_config(None, RUN), tmp_path / "after", 0, lambda i: GrpcChannel(url))
        train(load_config(None, RUN), tmp_path / "ref")
        assert [r["loss"] for r in rows(tmp_path / "after")] == [r["loss"] for r in rows(tmp_path / "ref")]
        assert summary["eval_loss_after"] < summary["eval_loss_before"]
    finally:
        server.stop(None)


def test_addresses_and_listening_rules():
    with pytest.raises(DeployError, match="plaintext grpc:// is allowed only to a loopback address"):
        parse_server("grpc://10.0.0.5:50051")
    assert parse_server("grpc://[::1]:7").host == "[::1]" and parse_server("grpcs://example.org:443").tls
    with pytest.raises(DeployError, match="HOST:PORT"):
        parse_server("grpcs://example.org")
    with pytest.raises(DeployError, match="refusing to listen on 0.0.0.0:.* without TLS"):
        _serve(host="0.0.0.0")
    server, _, _ = _serve(host="0.0.0.0", insecure=True)
    server.stop(None)


def test_serve_cli_refusals(tmp_path):
    from typer.testing import CliRunner

    from splittune.cli import app

    def cli(*args):
        result = CliRunner().invoke(app, list(args))
        return result.exit_code, " ".join(result.output.split())

    code, out = cli("serve", "--model", "tiny:llama", "--listen", "0.0.0.0:1")
    assert code == 2 and "without TLS" in out
    code, out = cli("train", "--server", "grpc://10.1.1.1:5")
    assert code == 2 and "allowed only to a loopback address" in out
    code, out = cli("health", "--server", f"grpc://127.0.0.1:{free_port()}")
    assert code == 2 and "does not answer" in out
    tokens = tmp_path / "t.yaml"
    tokens.write_text("alice: short\n")
    code, out = cli("serve", "--model", "tiny:llama", "--tokens", str(tokens))
    assert code == 2 and "at least 16 characters" in out


def test_certs_are_private_and_usable(tmp_path):
    written = make_certs(tmp_path, ["localhost"], ["carol"])
    assert (tmp_path / "carol.token").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    assert set(written) == {"ca", "server", "carol", "tokens"}


@pytest.mark.parametrize("schedule", ["sfl-v1"])  # (sfl-v1's batched rounds; sfl-v2's turns give up the same way)
def test_a_vanished_client_is_given_up_and_the_round_goes_on(tmp_path, serve_process, schedule):
    url = serve_process("--wait", "2")
    run = [*RUN, "clients=2", f"schedule={schedule}", "train.steps=4"]
    procs = launch_clients(tmp_path, url, run, 2)
    metrics = tmp_path / "c1" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.02)
    procs[1].kill()
    out, _ = procs[0].communicate(timeout=300)
    assert procs[0].returncode == 0, out
    assert [r["step"] for r in rows(tmp_path / "c0")] == [1, 2, 3, 4]
    log = "".join(p.read_text() for p in tmp_path.glob("serve-*.log"))
    assert '"event": "dropped", "client": 1' in log


def test_a_second_run_cannot_take_over_a_busy_server():
    server, _, port = _serve()
    url = f"grpc://127.0.0.1:{port}"
    try:
        first = GrpcChannel(url, client_id="alice")
        _hello(first)
        with pytest.raises(RemoteError) as err:
            _hello(GrpcChannel(url, client_id="bob"))
        assert err.value.code == "RESOURCE_EXHAUSTED" and "serving another run (clients alice)" in str(err.value)
        again = GrpcChannel(url, client_id="alice")  # alice restarting her own run while her old stream lingers
        assert _hello(again).meta["accepted"]
        first.close()
        again.close()
        deadline = time.time() + 10
        while True:  # once the first run's clients are gone, anyone may start a new run
            try:
                assert _hello(GrpcChannel(url, client_id="bob")).meta["accepted"]
                break
            except RemoteError:
                assert time.time() < deadline
                time.sleep(0.05)
    finally:
        server.stop(None)


def test_a_server_that_stops_answering_hits_the_reply_deadline():
    """Keepalive cannot see a live server that never replies; the per-reply deadline does."""
    release = threading.Event()

    def silent(requests, context):
        next(requests)
        release.wait(30)
        return iter(())

    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "splittune.Split", {"Session": grpc.stream_stream_rpc_method_handler(silent)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        channel = GrpcChannel(f"grpc://127.0.0.1:{port}", reply_timeout_s=1)
        with pytest.raises(RemoteError) as err:
            channel.call(Message("hello", "s"))
        assert err.value.code == "DEADLINE_EXCEEDED" and "no reply to 'hello' (step 0) within 1 s" in str(err.value)
        with pytest.raises(RemoteError, match="no reply"):  # the session is over: later calls fail the same way
            channel.call(Message("hello", "s"))
    finally:
        release.set()
        server.stop(None)


def test_a_tap_on_the_grpc_link_sees_what_the_local_one_sees():
    """Taps (what an observer sees; attacks read them) get the message as the receiving chain delivers it, and
    its frame's size, on either channel."""
    from splittune.cut import CutLink, terms_from

    server, _, port = _serve()
    try:
        seen = []
        link = CutLink(GrpcChannel(f"grpc://127.0.0.1:{port}"), "tapped", terms_from({"up": "raw", "down": "raw"}, True))
        link.add_tap(lambda direction, msg, n: seen.append((direction, msg, n)))
        cfg = load_config(None, RUN)
        link.hello(SessionSpec.from_run(cfg, resolve_model(cfg.model).fingerprint(), "llama", 0, 10).to_meta())
        hidden = torch.randn(2, 8, 64)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 6:] = 0  # padding: removed on the wire, restored (zeros) for the server
        msg = Message("activations", "tapped", 1, 0, {"hidden": hidden, "attention_mask": mask}, {"train": False})
        reply = link.call(msg)
        assert [(d, m.kind) for d, m, _ in seen] == [("up", "hello"), ("down", "hello"), ("up", "activations"), ("down", "activations")]
        up = seen[2][1]
        assert up is not msg and torch.equal(up.tensors["hidden"], hidden * mask[..., None])
        assert seen[2][2] < len(encode_frame(msg)) - 2 * 64 * 4 + 200  # two padded positions did not cross
        assert torch.equal(seen[3][1].tensors["hidden"], reply.tensors["hidden"])
        assert link.bytes_up == seen[0][2] + seen[2][2] and link.bytes_down == seen[1][2] + seen[3][2]
    finally:
        server.stop(None)


def test_a_tokens_file_can_bind_a_client_id_to_its_index(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text("alice: aaaaaaaaaaaaaaaaaaaa\nbob: {token: bbbbbbbbbbbbbbbbbbbb, index: 1}\n")
    tokens, bindings = load_tokens(path)
    assert tokens == {"alice": "a" * 20, "bob": "b" * 20} and bindings == {"bob": 1}
    for text, message in [("bob: {token: bbbbbbbbbbbbbbbbbbbb, idx: 1}", "unknown keys ['idx']; keys: token, index"),
                          ("bob: {token: bbbbbbbbbbbbbbbbbbbb, index: -1}", "must be a client index"),
                          ("bob: {index: 1}", "must be a string of at least 16 characters")]:
        path.write_text(text)
        with pytest.raises(DeployError, match=re.escape(message)):
            load_tokens(path)
    server, _, port = _serve({"alice": "a" * 20, "bob": "b" * 20}, bindings={"bob": 1})
    url = f"grpc://127.0.0.1:{port}"
    try:
        with pytest.raises(RemoteError) as err:  # bob may not take client 0's place (its data, its adapters)
            _hello(GrpcChannel(url, client_id="bob", token="b" * 20), client=0)
        assert err.value.code == "PERMISSION_DENIED" and "'bob' may only be client 1 of a run" in str(err.value)
        assert _hello(GrpcChannel(url, client_id="alice", token="a" * 20), client=0).meta["accepted"]
    finally:
        server.stop(None)
