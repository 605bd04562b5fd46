"""The server holds against careless and hostile clients (issue 23): what it keeps of a run is the run's own, steps
only go forward, a damaged checkpoint falls back to the one before, and a hello says nothing the server need not know."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from splittune import checkpoint
from splittune.channels.grpc import GrpcChannel
from splittune.config import load_config
from splittune.deploy.service import SplitService
from splittune.models.arch import detect_arch
from splittune.models.zoo import resolve_model
from splittune.parties import SessionSpec
from splittune.parties.party import public_model_name
from splittune.parties.server.handler import Server
from splittune.run import CHECKPOINTS, train, train_remote
from splittune.schedules.policy import POLICIES
from splittune.wire import Message

from hostile import topk_frame
from served import serve_here
from configs import tiny

RUN = tiny("cuts=[1,3]", "data.max_documents=6", "train.eval_every=0", "train.lr=0.01", "train.warmup_steps=0",
           "train.steps=4", "train.checkpoint_every=1")


class Killed(Exception):
    """The client process dying at a step (its streams end; the server keeps what it saved)."""


def kill_at(step):
    def progress(done, total, row):
        if row.get("step") == step:
            raise Killed
    return progress


def adapters(out):
    """Both parties' trained tensors as the run wrote them."""
    return {f"{party}/{k}": v for party in ("client", "server")
            for k, v in load_file(str(out / "adapters" / f"{party}.safetensors")).items()}


def _served_with_state(state):
    source = resolve_model("tiny:llama")
    server = Server(source, detect_arch(source.config()), source.config(), wait_s=30, state_dir=state, policies=POLICIES)
    return serve_here(SplitService(server, None))


def test_two_runs_of_one_config_keep_their_own_checkpoints(tmp_path):
    """Run A finishes, run B (the same config, another run directory) is killed at step 2 and resumes: it ends exactly
    as A did. Keyed by settings alone, A's steps 3 and 4 made B's step-2 checkpoint the oldest, deleted as written."""
    cfg = load_config(None, RUN)
    grpc_server, port = _served_with_state(tmp_path / "state")
    url = f"grpc://127.0.0.1:{port}"
    try:
        train_remote(cfg, tmp_path / "a", 0, lambda i: GrpcChannel(url))
        with pytest.raises(Killed):
            train_remote(cfg, tmp_path / "b", 0, lambda i: GrpcChannel(url), kill_at(2))
        summary = train_remote(cfg, tmp_path / "b", 0, lambda i: GrpcChannel(url))
    finally:
        grpc_server.stop(None)
    assert summary["steps"] == 4
    a, b = adapters(tmp_path / "a"), adapters(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    runs = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert len(runs) == 2, runs  # one folder per run
    assert (tmp_path / "a" / "run-id").read_text() != (tmp_path / "b" / "run-id").read_text()


def _server_and_hello():
    source = resolve_model("tiny:llama")
    server = Server(source, detect_arch(source.config()), source.config(), wait_s=5, policies=POLICIES)
    spec = SessionSpec.from_run(load_config(None, RUN), source.fingerprint(), "llama")
    reply = server.handle(Message("hello", "s1", meta=spec.to_meta()))
    assert reply.meta.get("accepted"), reply.meta
    return server


def step(server, at):
    return server.handle(Message("step", "s1", at, 0, {}, {"sq_norm": 0.0}))


def test_a_replayed_or_reordered_step_is_refused_and_moves_nothing():
    server = _server_and_hello()
    lrs = [step(server, 1).meta["lr"], step(server, 2).meta["lr"]]  # the twin: steps in order are served
    assert lrs[0] != lrs[1]
    for bad in (2, 1, 0, 5):  # replayed, older, before the first, past the run's 4 steps
        reply = step(server, bad)
        assert reply.kind == "error" and reply.meta["code"] == "FAILED_PRECONDITION", reply.meta
        assert f"step {bad} is out of order: client 0 last stepped at 2" in reply.meta["reason"]
    assert step(server, 3).meta["lr"] == pytest.approx(lrs[1] + (lrs[1] - lrs[0]))  # the schedule did not move


def _damage(folder):
    path = folder / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = load_config(None, RUN)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "run", kill_at(3))
    root = tmp_path / "run" / CHECKPOINTS / "client"
    assert checkpoint.latest(root) == 2  # killed in step 3, before its checkpoint
    _damage(root / "step-2")
    with pytest.warns(UserWarning, match=r"the checkpoint of step 2 is damaged .*resuming from the previous checkpoint, step 1"):
        summary = train(cfg, tmp_path / "run")
    whole = train(cfg, tmp_path / "whole")
    assert summary["steps"] == whole["steps"] == 4
    a, b = adapters(tmp_path / "run"), adapters(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    for s in (1, 2):
        checkpoint.save(tmp_path, s, {"x": torch.ones(4)}, {})
    assert checkpoint.latest(tmp_path) == 2  # the twin: intact checkpoints are found
    for s in (1, 2):
        _damage(tmp_path / f"step-{s}")
    with pytest.raises(checkpoint.CheckpointError, match=r"step 2 is damaged .*step 1 is damaged .*no intact checkpoint is left"):
        checkpoint.latest(tmp_path)


def test_the_hello_carries_no_local_path_and_no_sample_count(tmp_path):
    source = resolve_model("tiny:llama")
    spec = SessionSpec.from_run(load_config(None, RUN), source.fingerprint(), "llama", samples=123, model=source.describe())
    meta = spec.to_meta()
    assert "samples" not in meta and meta["model"] == "tiny:llama" and str(source.path) not in str(meta)
    assert spec.samples == 123  # the client keeps it (an aggregate carries its weight where averaging needs one)
    local = tmp_path / "private" / "llama-8b"
    local.mkdir(parents=True)
    assert public_model_name(f"{local} ({local})") == public_model_name(str(local)) == "llama-8b"
    assert public_model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id, as given
    assert SessionSpec.from_meta(meta).samples == 0


def test_a_token_file_others_can_read_is_warned_about(tmp_path):
    import warnings

    from splittune.deploy.files import read_token

    token = tmp_path / "alice.token"
    token.write_text("s3cret-token-of-alice\n")
    token.chmod(0o644)
    with pytest.warns(UserWarning, match=r"--token-file .*alice.token is readable by others \(permissions 0644\).*chmod 600"):
        assert read_token(token) == "s3cret-token-of-alice"
    token.chmod(0o600)  # the twin: a private file reads without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_token(token) == "s3cret-token-of-alice"


# -- admission: limits that cannot be bypassed ------------------------------------------------------------------

TOKENS = {"alice": "alice-token-0123456789"}


def _limited(**limits):
    from splittune.deploy.service import Limits

    source = resolve_model("tiny:llama")
    server = Server(source, detect_arch(source.config()), source.config(), wait_s=limits.pop("wait_s", 30), policies=POLICIES)
    service = SplitService(server, TOKENS, Limits(**limits))
    grpc_server, port = serve_here(service)
    return grpc_server, service, f"grpc://127.0.0.1:{port}"


def _proposal(**changes):
    source = resolve_model("tiny:llama")
    spec = SessionSpec.from_run(load_config(None, RUN), source.fingerprint(), "llama")
    return {**spec.to_meta(), **changes}


def _try_hello(url, session, **changes):
    from splittune.channels import RemoteError

    channel = GrpcChannel(url, "alice", TOKENS["alice"])
    try:
        reply = channel.call(Message("hello", session, meta=_proposal(**changes)))
        return ("accepted" if reply.kind == "hello" else reply.meta["code"], reply.meta.get("reason", "")), channel
    except RemoteError as err:
        return (err.code, str(err)), channel


def test_concurrent_hellos_cannot_pass_the_session_limit():
    from concurrent.futures import ThreadPoolExecutor

    grpc_server, service, url = _limited(max_sessions=4)
    channels = []
    try:
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda i: _try_hello(url, f"s{i}"), range(20)))
        channels = [c for _, c in results]
        outcomes = [r for r, _ in results]
        assert sum(code == "accepted" for code, _ in outcomes) == 4, outcomes
        refused = [why for code, why in outcomes if code != "accepted"]
        assert len(refused) == 16 and all("maximum of 4 sessions" in why for why in refused), refused
        assert len(service.owner) == 4
    finally:
        for c in channels:
            c.close()
        grpc_server.stop(None)


def _idle_streams(url, n):
    """``n`` authenticated streams that never send a frame; returns their calls (cancel to end them)."""
    import grpc
    import queue

    from splittune.channels.transport import SESSION_METHOD

    channel = grpc.insecure_channel(url.removeprefix("grpc://"))
    stub = channel.stream_stream(SESSION_METHOD, request_serializer=None, response_deserializer=None)
    metadata = [("x-splittune-client", "alice"), ("authorization", f"Bearer {TOKENS['alice']}")]
    calls = [stub(iter(queue.Queue().get, None), metadata=metadata) for _ in range(n)]
    return channel, calls


def _code_of(call, timeout=20):
    import grpc

    try:
        next(iter(call))
    except grpc.RpcError as err:
        return err.code().name, err.details()
    return "OK", ""


def test_idle_streams_neither_block_a_client_nor_health(tmp_path):
    from splittune.deploy.service import health

    grpc_server, _, url = _limited(max_sessions=4)
    channel, calls = _idle_streams(url, 30)
    try:
        status = health(url, timeout_s=5)  # 30 streams are open, and Health still answers
        assert status["status"] == "SERVING"
        cfg = load_config(None, [*RUN, "train.steps=2"])
        summary = train_remote(cfg, tmp_path / "run", 0, lambda i: GrpcChannel(url, "alice", TOKENS["alice"]))
        assert summary["steps"] == 2
    finally:
        for call in calls:
            call.cancel()
        channel.close()
        grpc_server.stop(None)


def test_waiting_streams_are_capped_and_time_out():
    grpc_server, _, url = _limited(max_pending=8, hello_timeout_s=1.0)
    channel, calls = _idle_streams(url, 12)
    try:
        codes = [_code_of(call) for call in calls]
        over = [c for c in codes if c[0] == "RESOURCE_EXHAUSTED"]
        late = [c for c in codes if c[0] == "DEADLINE_EXCEEDED"]
        assert len(over) == 4 and "8 connections already wait for their hello" in over[0][1], codes
        assert len(late) == 8 and "no hello within 1 s of connecting" in late[0][1], codes
    finally:
        channel.close()
        grpc_server.stop(None)


def test_a_run_larger_than_the_server_allows_is_refused_in_one_short_line():
    grpc_server, service, url = _limited(max_clients=4, wait_s=1)
    channels = []
    try:
        (code, why), c = _try_hello(url, "big", clients=1_000_000)
        channels.append(c)
        assert code == "RESOURCE_EXHAUSTED" and len(why) < 200, why
        assert "a run of 1000000 clients is more than this server accepts (serve --max-clients 4)" in why
        assert service.server.group is None  # nothing was held open for it
        (code, why), c = _try_hello(url, "fits", clients=4)  # the twin: a run within the limit gets as far as its round
        channels.append(c)
        assert "more than this server accepts" not in why
    finally:
        for c in channels:
            c.close()
        grpc_server.stop(None)


def test_a_bad_proposal_and_a_huge_id_get_short_answers(caplog):
    server = _server_and_hello()
    reply = server.handle(Message("hello", "s2", meta=_proposal(dtype="float8")))
    assert reply.meta["code"] == "INVALID_ARGUMENT" and "dtype 'float8'; dtypes: float32, bfloat16, float16" in reply.meta["reason"]
    reply = server.handle(Message("hello", "s3", meta=_proposal(client=5, clients=2)))
    assert "client 5 of 2 clients" in reply.meta["reason"]
    huge = "x" * 900_000
    reply = server.handle(Message("step", huge, 1, 0, {}, {"sq_norm": 0.0}))
    assert reply.kind == "error" and "more characters)" in reply.meta["reason"] and len(reply.meta["reason"]) < 1100
    # the twin: a short reason is left whole
    assert server.handle(Message("step", "nobody", 1, 0, {}, {"sq_norm": 0.0})).meta["reason"].endswith("send hello first")


def test_one_stream_cannot_buffer_many_half_sent_frames():
    from splittune.channels.transport import ChunkError, Reassembler, chunks

    frame = bytes(range(256)) * 64  # 16 KiB
    whole = Reassembler(max_frame_bytes=64 << 10, max_partial=4)
    for corr in range(1, 5):  # the twin: four interleaved frames within the limits all come out whole
        pieces = list(chunks(frame, 4096, corr))
        assert [whole.add(p) for p in pieces[:-1]] == [None] * 3
    assert [whole.add(list(chunks(frame, 4096, corr))[-1])[1] for corr in range(1, 5)] == [frame] * 4
    assert whole.buffered == 0
    many = Reassembler(max_frame_bytes=64 << 10, max_partial=4)
    for corr in range(1, 5):
        many.add(next(iter(chunks(frame, 4096, corr))))
    with pytest.raises(ChunkError, match="unfinished frames on one stream exceed 4$"):
        many.add(next(iter(chunks(frame, 4096, 5))))
    big = Reassembler(max_frame_bytes=20 << 10, max_partial=8)  # each frame fits, together they do not
    for corr in range(1, 3):
        big.add(next(iter(chunks(frame, 8192, corr))))
    with pytest.raises(ChunkError, match=r"unfinished frames on one stream exceed 20480 bytes together"):
        big.add(list(chunks(frame, 8192, 1))[1])


def test_a_displaced_session_is_told_why():
    server = _server_and_hello()
    assert step(server, 1).kind == "step"
    again = server.handle(Message("hello", "s2", meta=_proposal()))  # a second process with the same settings and id
    assert again.kind == "hello"
    reply = step(server, 2)
    assert reply.meta["code"] == "ABORTED" and "session 's1' has ended: a new run started on this server" in reply.meta["reason"]
    # the twin: a session the server never had is still just unknown
    assert "unknown session 'zz'; send hello first" in server.handle(Message("step", "zz", 1, 0, {}, {"sq_norm": 0.0})).meta["reason"]


@pytest.mark.parametrize("shape", [(0, 8, 64), (2, 0, 64)], ids=["no-rows", "no-tokens"])
def test_an_empty_batch_is_a_short_refusal_not_an_internal_error(shape):
    server = _server_and_hello()
    rows, seq, width = shape
    tensors = {"hidden": torch.zeros(shape), "attention_mask": torch.ones(rows, seq, dtype=torch.long)}
    reply = server.handle(Message("activations", "s1", 1, 0, tensors, {"train": True}))
    assert reply.kind == "error" and reply.meta["code"] == "INVALID_ARGUMENT", reply.meta
    assert "an empty batch or a zero-length sequence" in reply.meta["reason"]
    # the twin: one row of one token is served
    ok = {"hidden": torch.zeros(1, 1, width), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    assert server.handle(Message("activations", "s1", 1, 1, ok, {"train": True})).kind == "activations"


def test_a_full_disk_is_one_error_line_and_the_same_command_resumes(tmp_path, monkeypatch):
    import errno

    from typer.testing import CliRunner

    from splittune.cli import app

    real_save = checkpoint.save

    def full_after_two(root, step, *args, **kwargs):  # the client's checkpoint of step 3 meets a full disk
        if root.name == "client" and step == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(root / f"step-{step}"))
        return real_save(root, step, *args, **kwargs)

    command = ["train", *[a for s in RUN for a in ("--set", s)], "--out", str(tmp_path / "run")]
    monkeypatch.setattr(checkpoint, "save", full_after_two)
    result = CliRunner().invoke(app, command, env={"COLUMNS": "400"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "error: the disk is full: cannot write" in text and "step-3" in text, text
    assert "run the same command to resume from the last checkpoint" in text and "Traceback" not in text
    monkeypatch.setattr(checkpoint, "save", real_save)  # the twin: space again, and the same command resumes and finishes
    result = CliRunner().invoke(app, command, env={"COLUMNS": "400"})
    assert result.exit_code == 0 and "resuming from step 2" in result.output, result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


def test_a_few_bytes_cannot_name_a_huge_tensor_the_bound_is_the_sessions_codec():
    from splittune.cut.link import ServerLink
    from splittune.wire import FrameError, decode_frame, parse_frame

    legal = topk_frame("activations", "s1", rows=2)
    hostile = topk_frame("activations", "s1", rows=4096, empty=True)  # ~200 bytes naming 32 MiB of activations
    assert len(hostile) < 400 and parse_frame(hostile).decoded_bytes >= 32 << 20
    with pytest.raises(FrameError, match=r"0 payload bytes of codec topk would decode to \d+ bytes, more than the 10x"):
        parse_frame(hostile).decode({})
    # a legal payload at the session's fraction (1 %) expands 50x: past topk's default bound, within the session's
    with pytest.raises(FrameError, match="more than the 10x a legal payload expands"):
        parse_frame(legal).decode({})
    from splittune.wire.codecs import make_codec
    assert torch.is_tensor(parse_frame(legal).decode({"topk": make_codec({"name": "topk", "fraction": 0.01})}).tensors["hidden"])
    assert decode_frame(hostile).tensors["hidden"].shape[0] == 4096  # the twin: without a session's bound it would be built

    # through the server's end of the cut: the session's chain sets the bound, and the session stays usable
    from splittune.wire import encode_frame

    source = resolve_model("tiny:llama")
    link = ServerLink(Server(source, detect_arch(source.config()), source.config(), wait_s=5, policies=POLICIES).handle)
    terms = {"up": [{"name": "codec", "hidden": {"name": "topk", "fraction": 0.01}, "grad": "raw"}], "down": []}
    assert decode_frame(link.serve(encode_frame(Message("hello", "s1", meta={**_proposal(), "chain": terms})))).kind == "hello"
    refused = decode_frame(link.serve(hostile))
    assert refused.meta["code"] == "INVALID_ARGUMENT" and "would decode to" in refused.meta["reason"], refused.meta
    assert decode_frame(link.serve(legal)).kind == "activations"


def _hello_in_thread(url, session, client_id="alice", **changes):
    """A hello on its own stream, answered in a thread (a hello of a several-client run waits for the others)."""
    import threading

    result = {}
    channel = GrpcChannel(url, client_id, TOKENS.get(client_id))

    def run():
        result["reply"] = _answer(channel, session, **changes)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return channel, thread, result


def _answer(channel, session, **changes):
    from splittune.channels import RemoteError

    try:
        reply = channel.call(Message("hello", session, meta=_proposal(**changes)))
        return "accepted" if reply.kind == "hello" else reply.meta["code"], reply.meta.get("reason", "")
    except RemoteError as err:
        return err.code, str(err)


def test_a_client_restarted_while_waiting_for_the_others_takes_its_place():
    grpc_server, service, url = _limited(wait_s=20)
    TOKENS["bob"] = "bob-token-0123456789ab"
    try:
        first, waiting, _ = _hello_in_thread(url, "a-1", clients=2, client=0, run_id="run-a")
        time.sleep(0.5)
        # the same client, its first process still connected: refused, that process keeps its place
        assert _answer(GrpcChannel(url, "alice", TOKENS["alice"]), "a-2", clients=2, client=0, run_id="run-a") == (
            "ALREADY_EXISTS", "client 0 of this run is still connected from another process; a restarted client rejoins "
            "once its old process has ended")
        # another run's client 0 (another run id) cannot take the place either
        code, reason = _answer(GrpcChannel(url, "alice", TOKENS["alice"]), "x-1", clients=2, client=0, run_id="run-x")
        assert code == "INVALID_ARGUMENT" and "client 0 already has a session in this run" in reason
        first.close()  # the process dies while it waits for client 1
        deadline = time.time() + 10
        while service.stream_of["a-1"].is_active() and time.time() < deadline:
            time.sleep(0.05)
        again, rejoined, got = _hello_in_thread(url, "a-3", clients=2, client=0, run_id="run-a")  # the same command again
        time.sleep(0.5)
        peer, joined, other = _hello_in_thread(url, "b-1", client_id="bob", clients=2, client=1, run_id="run-b")
        for thread in (rejoined, joined, waiting):
            thread.join(20)
        assert got["reply"][0] == "accepted" and other["reply"][0] == "accepted", (got, other)
        assert set(service.server.sessions) == {"a-3", "b-1"}
        again.close()
        peer.close()
    finally:
        TOKENS.pop("bob")
        grpc_server.stop(None)


def test_a_client_given_up_cannot_rejoin_the_run_that_went_on():
    source = resolve_model("tiny:llama")
    server = Server(source, detect_arch(source.config()), source.config(), wait_s=5, policies=POLICIES)
    import threading

    replies = {}
    hellos = [threading.Thread(target=lambda i=i: replies.__setitem__(i, server.handle(
        Message("hello", f"s{i}", meta=_proposal(clients=2, client=i, run_id=f"run-{i}"))))) for i in range(2)]
    for t in hellos:
        t.start()
    for t in hellos:
        t.join(20)
    assert all(r.kind == "hello" for r in replies.values())
    server.group.drop(1)
    reply = server.handle(Message("hello", "s1-again", meta=_proposal(clients=2, client=1, run_id="run-1")))
    assert reply.meta["code"] == "FAILED_PRECONDITION"
    assert "client 1 was given up after missing a round and the run went on without it; it cannot rejoin" in reply.meta["reason"]
