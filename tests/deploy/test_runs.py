"""Several runs on one server (``serve --max-runs``): each equals the same run alone, none can reach another's
state, and the runs share one frozen base."""

import json
import subprocess
import time

import pytest

from splittune.channels import RemoteError
from splittune.channels.grpc import GrpcChannel
from splittune.config import load_config
from splittune.deploy.service import SplitService
from splittune.engines.local import server_for
from splittune.models.partition import is_placeholder
from splittune.models.zoo import resolve_model
from splittune.parties import SessionSpec
from splittune.parties.server.host import Host
from splittune.run import train, train_remote
from splittune.wire import Message

from configs import tiny
from served import CLI, serve_here

RUN = tiny("cuts=[1,3]", "train.steps=3", "data.max_documents=6", "train.lr=0.01", "train.warmup_steps=0")
OTHER = [*RUN, "seed=7", "cuts=[2,3]", "lora.rank=2", "clients=2", "schedule=sfl-v2", "train.steps=8"]
TOKENS = {"alice": "alice-token-0123456789ab", "bob": "bob-token-0123456789abcd", "carol": "carol-token-0123456789ab"}


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_at_once_each_equal_the_run_alone(tmp_path, host):
    """One server of two runs: a one-client run (here) and a two-client sfl-v2 run with other cuts, rank and seed (both
    clients in another process) train at the same time; each run's steps and bytes equal the same run alone."""
    runs, service, url = host
    other = subprocess.Popen([*CLI[:1], "-c", "import sys; from pathlib import Path; from splittune.config import load_config; "
                              "from splittune.channels.grpc import GrpcChannel; from splittune.run import train_remote; "
                              "train_remote(load_config(None, sys.argv[1:-3]), Path(sys.argv[-2]), [0, 1], "
                              "lambda i: GrpcChannel(sys.argv[-1], 'bob', sys.argv[-3]))",
                              *OTHER, TOKENS["bob"], str(tmp_path / "b"), url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        deadline = time.time() + 120
        while sorted(service.owner.values()) != ["bob", "bob"]:  # the other run is under way: this one starts beside it
            assert other.poll() is None and time.time() < deadline, other.stdout.read() if other.poll() is not None else ""
            time.sleep(0.05)
        train_remote(load_config(None, RUN), tmp_path / "a", 0, lambda i: GrpcChannel(url, "alice", TOKENS["alice"]))
        status = json.loads(service.health(b"", None))
        out, _ = other.communicate(timeout=300)
    finally:
        other.kill()
    assert other.returncode == 0, out
    train(load_config(None, RUN), tmp_path / "alone-a")
    train(load_config(None, OTHER), tmp_path / "alone-b")
    key = lambda r: (r["step"], r["client"], r["loss"], r["bytes_up"], r["bytes_down"])  # noqa: E731
    assert [key(r) for r in rows(tmp_path / "a")] == [key(r) for r in rows(tmp_path / "alone-a")]
    assert [key(r) for r in rows(tmp_path / "b")] == [key(r) for r in rows(tmp_path / "alone-b")]
    assert status["max_runs"] == 2 and sorted(r["clients"] for r in status["runs"]) == [1, 2]
    assert len(runs.runs) == 2 and runs.runs[0].group.party is not runs.runs[1].group.party


def _proposal(run, **changes):
    cfg = load_config(None, run)
    return {**SessionSpec.from_run(cfg, resolve_model(cfg.model).fingerprint(), "llama").to_meta(), **changes}


def _call(channel, kind, session, **meta):
    try:
        reply = channel.call(Message(kind, session, meta=meta))
        return "ok" if reply.kind != "error" else reply.meta["code"], reply
    except RemoteError as err:
        return err.code, str(err)


@pytest.fixture
def host():
    source = resolve_model("tiny:llama")
    runs = Host(lambda bank: server_for(source, wait_s=20, bank=bank), max_runs=2)
    service = SplitService(runs, TOKENS)
    grpc_server, port = serve_here(service)
    yield runs, service, f"grpc://127.0.0.1:{port}"
    grpc_server.stop(None)
    runs.close()


def test_runs_are_isolated_and_a_full_server_says_so(host):
    runs, service, url = host
    alice, bob, carol = (GrpcChannel(url, name, TOKENS[name]) for name in ("alice", "bob", "carol"))
    assert _call(alice, "hello", "a-1", **_proposal(RUN, run_id="run-a"))[0] == "ok"
    assert _call(bob, "hello", "b-1", **_proposal(RUN, run_id="run-b", seed=3))[0] == "ok"  # client 0 too, another run
    code, reason = _call(carol, "hello", "c-1", **_proposal(RUN, run_id="run-c"))
    assert code == "RESOURCE_EXHAUSTED" and "maximum of 2 runs (clients alice, bob) (serve --max-runs)" in reason
    # each run's state is its own: both runs' client 0 hold sessions; neither client can use the other's
    assert set(runs.sessions) == {"a-1", "b-1"} and runs.route["a-1"] is not runs.route["b-1"]
    assert _call(GrpcChannel(url, "alice", TOKENS["alice"]), "state", "b-1")[0] == "PERMISSION_DENIED"
    code, reply = _call(bob, "state", "b-1")
    assert code == "ok" and set(reply.tensors) and all("lora" in k for k in reply.tensors)
    a, b = (r.group.party for r in runs.runs)
    assert a is not b
    frozen = [(name, p) for name, p in a.model.named_parameters()
              if not p.requires_grad and "lora_" not in name and not is_placeholder(p)]  # (not the blocks it does not hold)
    theirs = dict(b.model.named_parameters())
    assert frozen and all(p.data_ptr() == theirs[name].data_ptr() for name, p in frozen)  # one frozen base
    assert all(p.data_ptr() != theirs[name].data_ptr() for name, p in a.model.named_parameters() if "lora_" in name)
    status = json.loads(service.health(b"", None))
    assert [r["sessions"] for r in status["runs"]] == [1, 1]
    alice.close()  # alice's run ends: carol's run takes its slot; bob's run is untouched
    deadline = time.time() + 10
    while "a-1" in service.owner and time.time() < deadline:
        time.sleep(0.05)
    carol = GrpcChannel(url, "carol", TOKENS["carol"])  # (a refused hello ended the stream it came on)
    assert _call(carol, "hello", "c-2", **_proposal(RUN, run_id="run-c"))[0] == "ok"
    assert _call(bob, "state", "b-1")[0] == "ok" and runs.route["c-2"] is not runs.route["b-1"]
    assert len(runs.runs) == 2
    bob.close()
    carol.close()


def test_one_run_at_a_time_by_default(host):
    """The twin: the same hellos on a server of one run refuse the second run, as before."""
    _, service, url = host
    service.server.max_runs = 1
    alice, bob = (GrpcChannel(url, name, TOKENS[name]) for name in ("alice", "bob"))
    assert _call(alice, "hello", "a-1", **_proposal(RUN, run_id="run-a"))[0] == "ok"
    code, reason = _call(bob, "hello", "b-1", **_proposal(RUN, run_id="run-b", seed=3))
    assert code == "RESOURCE_EXHAUSTED" and "serving another run (clients alice)" in reason
    alice.close()
    bob.close()
