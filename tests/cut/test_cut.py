"""The cut as a pipeline: the negotiated chain (padding removal, codecs), typed meta, pipelined micro-batches,
replies in any order, and the emulated link's arithmetic."""

from concurrent.futures import Future

import pytest
import torch

from splittune.channels import LocalChannel, RemoteError
from splittune.channels.base import Channel
from splittune.channels.emulated import LinkModel
from splittune.config import load_config
from splittune.cut import ChainError, ServerLink, terms_from
from splittune.cut.chain import Chain
from splittune.models.zoo import resolve_model
from splittune.parties import SessionSpec
from splittune.run import build, train
from splittune.wire import Message, encode_frame
from configs import tiny

TINY = tiny("cuts=[1,3]", "train.seq_len=16", "train.batch_size=4", "data.max_documents=6", "train.steps=3",
            "train.lr=0.01", "train.warmup_steps=0")
WIDTH = 64


def padded_batch(left: bool) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (4, 16))
    mask = torch.ones_like(ids)
    if left:
        mask[0, :5] = 0
        mask[2, :3] = 0
    else:
        mask[1, 10:] = 0
        mask[3, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if left:  # an instruction batch: the first real tokens are prompt, no label
        labels[0, 5:7] = -100
        labels[2, 3:5] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_padding_never_crosses_and_changes_nothing(left):
    """Bytes of a padded batch are its real tokens × width × 4 plus what the raw frame spends on the rest; the
    step equals the one that sends the padding."""
    batch = padded_batch(left)
    real = int(batch["attention_mask"].sum())
    results = {}
    for removal in (True, False):
        client, _, link, _ = build(load_config(None, [*TINY, f"padding_removal={removal}"]))
        seen = []
        link.channel.request = _recording(link.channel.request, seen)
        client.train_step(1, [batch])
        results[removal] = (seen, client.party.state())
    (packed, state), (full, reference) = results[True], results[False]
    assert len(packed) == len(full) == 3  # activations, gradients, step
    padding = (16 * 4 - real) * WIDTH * 4  # what the padded positions of one fp32 tensor cost
    for sent, whole in zip(packed[:2], full[:2]):  # the chain's own note ("packed") costs a few bytes back
        assert padding - 48 < whole - sent <= padding
    for k in reference:
        assert torch.equal(state[k], reference[k]), k


def _recording(request, seen):
    def wrapped(frame):
        seen.append(len(frame))
        return request(frame)
    return wrapped


def test_packed_bytes_are_real_tokens_times_width():
    """The exact byte count of a packed activation frame: real tokens × width × 4 + the frame without the hidden."""
    chain = Chain(terms_from({"up": "raw", "down": "raw"}, True), "client")
    batch = padded_batch(False)
    hidden = torch.randn(4, 16, WIDTH)
    msg = Message("activations", "s", 1, 0, {"hidden": hidden, "attention_mask": batch["attention_mask"]}, {"train": True})
    frame = chain.encode(msg)
    real = int(batch["attention_mask"].sum())
    same = Message("activations", "s", 1, 0, {"hidden": torch.zeros(real, WIDTH), "attention_mask": batch["attention_mask"]},
                   {"train": True, "cut": {"packed": ["hidden"]}})
    assert len(frame) == len(encode_frame(same))  # the frame of exactly the real tokens' rows
    header = __import__("msgpack").unpackb(frame[8 : 8 + int.from_bytes(frame[4:8], "little")])
    assert [(e["name"], e["nbytes"]) for e in header["tensors"]] == [("hidden", real * WIDTH * 4), ("attention_mask", 4 * 16 * 8)]
    server = Chain(chain.terms, "server")
    got = server.decode(frame)
    assert torch.equal(got.tensors["hidden"], hidden * batch["attention_mask"][..., None])
    assert "cut" not in got.meta


def test_a_packed_tensor_that_does_not_fit_the_mask_is_refused():
    chain = Chain(terms_from({"up": "raw", "down": "raw"}, True), "server")
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[0, 3] = 0
    bad = Message("activations", "s", 1, 0, {"hidden": torch.randn(5, 8), "attention_mask": mask}, {"cut": {"packed": ["hidden"]}})
    with pytest.raises(ChainError, match="has 5 positions, but 7 positions were kept"):
        chain.decode(encode_frame(bad))
    orphan = Message("gradients", "s", 9, 0, {"grad": torch.randn(7, 8)}, {"cut": {"packed": ["grad"]}})
    with pytest.raises(ChainError, match="never saw"):
        chain.decode(encode_frame(orphan))


def test_lossy_codecs_are_negotiated_counted_and_measured(tmp_path):
    """int8 up and down: the run reports each direction's relative error; bytes fall ~4x; raw's error is none."""
    raw = train(load_config(None, TINY), tmp_path / "raw")
    int8 = train(load_config(None, [*TINY, "codec.up=int8", "codec.down=int8"]), tmp_path / "int8")
    rows = [__import__("json").loads(line) for line in (tmp_path / "int8" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["codec_error_up"] < 0.05 and 0 < r["codec_error_down"] < 0.05 for r in rows)
    raw_rows = [__import__("json").loads(line) for line in (tmp_path / "raw" / "metrics.jsonl").read_text().splitlines()]
    assert all("codec_error_up" not in r for r in raw_rows)
    assert raw["bytes_up"] / int8["bytes_up"] > 2.5  # activations and gradients shrink ~3.9x; the hello and state do not
    assert abs(int8["eval_loss_after"] - raw["eval_loss_after"]) < 0.05 * raw["eval_loss_after"]


def test_a_hello_naming_an_unknown_codec_or_transform_is_refused():
    cfg = load_config(None, TINY)
    client, server, link, source = build(cfg)
    meta = SessionSpec.from_run(cfg.resolve(4), source.fingerprint(), "llama").to_meta()
    serve = ServerLink(server.handle).serve
    for terms, expect in (({"up": [{"name": "zstd"}], "down": []}, "unknown transform 'zstd'; transforms here: padding, codec"),
                          ({"up": [{"name": "codec", "hidden": "lz4"}], "down": []}, "unknown codec 'lz4'")):
        channel = LocalChannel(serve)
        with pytest.raises(RemoteError, match=expect):
            channel.call(Message("hello", "x", meta={**meta, "chain": terms}))


@pytest.mark.parametrize("kind,meta,field", [
    ("activations", {"train": True, "num_items": "3"}, "num_items"),
    ("activations", {"train": 1}, "train"),
    ("activations", {"train": False, "score_positions": [0, 1], "score_tokens": "x"}, "score_tokens"),
    ("activations", {"train": True, "colour": "red"}, "colour"),
    ("gradients", {"want_grad": "yes"}, "want_grad"),
    ("step", {"sq_norm": "big"}, "sq_norm"),
    ("step", {}, "sq_norm"),
    ("aggregate", {"weight": -1}, "weight"),
    ("relay_put", {"optimizer": 3}, "optimizer"),
])
def test_malformed_meta_is_invalid_argument_naming_the_field(kind, meta, field):
    client, server, link, _ = build(load_config(None, TINY))
    hidden = {"hidden": torch.zeros(1, 4, WIDTH), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    tensors = hidden if kind == "activations" else {}
    with pytest.raises(RemoteError) as err:
        link.call(Message(kind, link.session, 1, 0, tensors, meta))
    assert err.value.code == "INVALID_ARGUMENT" and repr(field) in str(err.value), str(err.value)
    # twin: well-formed meta passes validation (and reaches the model)
    reply = link.call(Message("activations", link.session, 1, 0, hidden, {"train": False}))
    assert reply.tensors["hidden"].shape == (1, 4, WIDTH)


def test_candidate_positions_outside_the_sequence_are_refused():
    client, server, link, _ = build(load_config(None, [*TINY, "cuts=[2]"]))
    tensors = {"hidden": torch.zeros(1, 4, WIDTH), "attention_mask": torch.ones(1, 4, dtype=torch.long),
               "labels": torch.full((1, 4), -100)}
    with pytest.raises(RemoteError, match="'score_positions' must lie in 0..3"):
        link.call(Message("activations", link.session, 0, 0, tensors, {"train": False, "score_positions": [9], "score_tokens": [1]}))


# -- pipelining -----------------------------------------------------------------------------------------
def _states(tmp_path, name, *sets):
    summary = train(load_config(None, [*TINY, *sets]), tmp_path / name)
    from safetensors.torch import load_file

    adapters = {**load_file(tmp_path / name / "adapters" / "client.safetensors"), **load_file(tmp_path / name / "adapters" / "server.safetensors")}
    losses = [__import__("json").loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, adapters, losses


def _grads(*parties):
    return {n: p.grad.clone() for party in parties for n, p in party.model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("cuts", ["cuts=[1,3]", "cuts=[2]"], ids=["u-shape", "two-part"])
def test_pipelined_micro_batches_equal_the_unpipelined_step(tmp_path, cuts):
    """The same micro-batches one at a time or all in flight: bit-identical runs (clipping on); against one
    whole batch: the same loss and gradients to 1e-6."""
    _, serial, loss_serial = _states(tmp_path, "serial", cuts, "train.micro_batches=4", "train.max_in_flight=1")
    _, piped, loss_piped = _states(tmp_path, "piped", cuts, "train.micro_batches=4")
    assert loss_piped == loss_serial
    for k in serial:
        assert torch.equal(piped[k], serial[k]), k
    batch = padded_batch(True)
    results = []
    for m in (1, 4):
        client, server, _, _ = build(load_config(None, [*TINY, cuts, f"train.micro_batches={m}"]))
        loss, _ = client.backward(1, [batch])
        results.append((loss, _grads(client.party, server.party)))
    (loss_whole, whole), (loss_micro, micro) = results
    assert loss_micro == pytest.approx(loss_whole, abs=1e-6)
    assert whole.keys() == micro.keys() and whole
    for k in whole:
        assert torch.allclose(micro[k], whole[k], atol=1e-6, rtol=0), k


class Reversing(Channel):
    """A channel that holds replies back and hands them over newest first (the worst order a link may give)."""

    def __init__(self, inner: Channel):
        super().__init__()
        self.inner = inner
        self.held: list[tuple[Future, Future]] = []

    def _submit(self, frame):
        outer = Future()
        self.held.append((self.inner.request(frame), outer))
        return outer

    def wait(self, future, msg):
        if not future.done():  # release everything held so far, newest first
            for inner, outer in reversed(self.held):
                outer.arrived_at = 0.0
                outer.set_result(inner.result())
            self.held.clear()
        return future.result()


def test_replies_in_any_order_give_the_same_step():
    cfg = load_config(None, [*TINY, "train.micro_batches=4"])
    batch = padded_batch(False)
    runs = []
    for reorder in (False, True):
        client, _, link, _ = build(cfg)
        if reorder:
            link.channel = Reversing(link.channel)
        result = client.train_step(1, [batch])
        runs.append((result.loss, client.party.state(), {**client.server_state()}))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1:], runs[1][1:]):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_micro_batches_beyond_the_batch_are_refused(tmp_path):
    with pytest.raises(ValueError, match="micro_batches=8 exceeds the 4 rows"):
        train(load_config(None, [*TINY, "train.micro_batches=8"]), tmp_path / "x")


# -- the emulated link ------------------------------------------------------------------------------------
def test_link_arithmetic_on_a_fake_clock():
    """10 Mbps, 20 ms: a frame arrives after latency + bytes/bandwidth; frames queue behind each other per direction."""
    link = LinkModel({"up": 10e6 / 8, "down": 1e6 / 8}, latency=0.020)
    assert link.deliver("up", 0.0, 125_000) == pytest.approx(0.1 + 0.02)  # 1 Mbit at 10 Mbps
    assert link.deliver("up", 0.05, 125_000) == pytest.approx(0.2 + 0.02)  # waits for the first to leave
    assert link.deliver("up", 1.0, 0) == pytest.approx(1.02)  # an idle link: latency only
    assert link.deliver("down", 0.0, 125_000) == pytest.approx(1.0 + 0.02)  # the other direction has its own queue
    unlimited = LinkModel({"up": None, "down": None}, latency=0.005)
    assert unlimited.deliver("up", 3.0, 10**9) == pytest.approx(3.005)


def test_an_emulated_link_changes_time_not_bytes_or_results(tmp_path):
    plain = train(load_config(None, TINY), tmp_path / "plain")
    slow = train(load_config(None, [*TINY, "link.bandwidth_mbps=50", "link.latency_ms=5"]), tmp_path / "slow")
    assert (plain["bytes_up"], plain["bytes_down"], plain["train_loss_last"]) == (slow["bytes_up"], slow["bytes_down"], slow["train_loss_last"])
    rows = [__import__("json").loads(line) for line in (tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()]
    # each step: activations up and down, gradients up and down, the step message: at least 6 one-way latencies
    assert all(r["wire_s"] >= 6 * 0.005 for r in rows)


# -- the same chain over gRPC ---------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["raw", "bf16", "int8", "int4", "topk"])
def test_grpc_bytes_and_results_equal_in_process_for_every_codec(tmp_path, codec):
    """A client process's view over gRPC (pipelined, padded instruction data) equals the in-process run: the
    server encodes its replies with the negotiated downlink codec."""
    from served import serve_here
    from splittune.channels.grpc import GrpcChannel
    from splittune.deploy.service import SplitService
    from splittune.models.arch import detect_arch
    from splittune.parties.server.handler import Server
    from splittune.run import train_remote
    from splittune.schedules.policy import POLICIES

    sets = [*TINY, f"codec.up={codec}", f"codec.down={codec}", "train.micro_batches=2", "data.source=builtin:sentiment",
            "data.max_documents=200", "data.max_eval_examples=8", "train.seq_len=320"]
    local = train(load_config(None, sets), tmp_path / "local")
    source = resolve_model("tiny:llama")
    service = SplitService(Server(source, detect_arch(source.config()), wait_s=30, policies=POLICIES), None)
    server, port = serve_here(service)
    try:
        remote = train_remote(load_config(None, sets), tmp_path / "remote", 0, lambda i: GrpcChannel(f"grpc://127.0.0.1:{port}"))
    finally:
        server.stop(None)
    rows = {name: [__import__("json").loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("local", "remote")}
    assert [(r["loss"], r["bytes_up"], r["bytes_down"]) for r in rows["local"]] == [(r["loss"], r["bytes_up"], r["bytes_down"]) for r in rows["remote"]]
    assert (local["bytes_up"], local["bytes_down"]) == (remote["bytes_up"], remote["bytes_down"])


@pytest.mark.parametrize("schedule", ["sfl-v1", "sfl-v2"])
def test_pipelining_with_several_clients_changes_nothing(tmp_path, schedule):
    """sfl-v1 still batches the clients' rows of each micro-batch; sfl-v2 still takes turns: pipelined runs equal
    the same micro-batches sent one at a time, bit for bit."""
    sets = ["clients=2", f"schedule={schedule}", "train.micro_batches=2"]
    runs = []
    for name, flight in (("serial", "train.max_in_flight=1"), ("piped", "train.max_in_flight=2")):
        train(load_config(None, [*TINY, *sets, flight]), tmp_path / name)
        runs.append([(r["client"], r["loss"]) for r in map(__import__("json").loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())])
    from safetensors.torch import load_file

    assert runs[0] == runs[1]
    a, b = (load_file(tmp_path / name / "adapters" / "global.safetensors") for name in ("serial", "piped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
