"""The activation cache: with a frozen bottom a sample's activations cross once; later epochs reuse what the
server kept. Cached runs equal uncached ones exactly (losses, adapters, evaluations), under eviction, after
the server lost its cache, after a resume and over gRPC; the cache turns itself off where it cannot be exact;
malformed cache meta is refused and the server keeps serving."""

import json

import pytest
import torch
from safetensors.torch import load_file

from splittune.channels import RemoteError
from splittune.config import SplittuneWarning, load_config
from splittune.parties import Server
from splittune.parties.cache import CACHE_MISS, ActivationCache
from splittune.parties.client.pipeline import Client
from splittune.run import build, train
from configs import tiny
from interrupt import killed_then_resumed

# 4 training examples, 2 a batch: an epoch is 2 steps, so steps 3-6 see every sample again
RUN = tiny("train.steps=6", "data.max_train_examples=4", "train.lr=0.01", "train.warmup_steps=1",
           "segments.bottom=frozen")
ROW = 32 * 64 * 4  # one cached row of tiny:llama: seq 32, width 64, fp32


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_run(a, b):
    """Identical losses per step, adapters and evaluations."""
    assert [r["loss"] for r in rows(a)] == [r["loss"] for r in rows(b)]
    parts = sorted(p.name for p in (a / "adapters").glob("*.safetensors"))
    assert parts and parts == sorted(p.name for p in (b / "adapters").glob("*.safetensors"))
    for part in parts:
        sa, sb = load_file(a / "adapters" / part), load_file(b / "adapters" / part)
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), part
    ea, eb = (json.loads((x / "summary.json").read_text()) for x in (a, b))
    assert (ea["eval_loss_before"], ea["eval_loss_after"]) == (eb["eval_loss_before"], eb["eval_loss_after"])
    return ea, eb


def run(tmp_path, name, *extra):
    out = tmp_path / name
    return train(load_config(None, [*RUN, *extra]), out), out


@pytest.mark.parametrize("extra", [["cuts=[2]"], ["cuts=[1,3]", "train.micro_batches=2"]], ids=["two-part", "u-shape-pipelined"])
def test_a_cached_run_equals_the_uncached_one(tmp_path, extra):
    cached, on = run(tmp_path, "on", *extra)
    plain, off = run(tmp_path, "off", *extra, "cache.max_bytes=0")
    same_run(on, off)
    c = cached["cache"]
    assert c["on"] and not plain["cache"]["on"] and plain["cache"]["off_reason"] == "cache.max_bytes is 0"
    assert (c["misses"], c["hits"], c["evictions"], c["resent"]) == (4, 8, 0, 0)  # each sample sent once
    skipped = 4 * (2 if "train.micro_batches=2" in extra else 1)
    assert c["bottom_forwards_skipped"] == skipped  # every bottom forward of epochs 2 and 3
    got, want = rows(on), rows(off)
    assert [(r["cache_hits"], r["cache_misses"]) for r in got] == [(0, 2)] * 2 + [(2, 0)] * 4
    assert all(r["bottom_s"] < 1e-3 for r in got[2:])
    saved = c["bytes_saved_up"] / 4  # per step from epoch 2: the activations that did not cross
    assert saved == 2 * ROW
    for g, w in zip(got[2:], want[2:]):
        assert w["bytes_up"] - g["bytes_up"] > 0.97 * saved  # all but the keys
    if extra == ["cuts=[2]"]:  # two-part: what still goes up is masks, labels and keys
        assert all(g["bytes_up"] < 0.1 * w["bytes_up"] for g, w in zip(got[2:], want[2:]))
    assert all(g["bytes_up"] - w["bytes_up"] < 200 for g, w in zip(got[:2], want[:2]))  # epoch 1: the keys' cost


def test_sfl_v1_batches_cached_rows_of_several_clients(tmp_path):
    """Each client has its own cache on the server; the rows rebuilt from it join the batched forward."""
    extra = ["cuts=[1,3]", "clients=2", "schedule=sfl-v1", "train.steps=4"]
    cached, on = run(tmp_path, "on", *extra)
    run(tmp_path, "off", *extra, "cache.max_bytes=0")
    same_run(on, tmp_path / "off")
    assert (cached["cache"]["misses"], cached["cache"]["hits"]) == (8, 8)  # 4 samples each, sent once


def test_over_grpc_a_server_cap_is_what_both_ends_use(tmp_path):
    """Contract 4: over gRPC the same crossings and bytes; ``serve --max-cache-bytes`` caps what the client
    asked, the hello tells the client, and its mirror follows (no refusal)."""
    from served import serve_here
    from splittune.channels.grpc import GrpcChannel
    from splittune.deploy.service import SplitService
    from splittune.models.arch import detect_arch
    from splittune.models.zoo import resolve_model
    from splittune.run import train_remote
    from splittune.schedules.policy import POLICIES

    extra = ["cuts=[1,3]", "train.micro_batches=2"]
    local, _ = run(tmp_path, "local", *extra, f"cache.max_bytes={3 * ROW}")
    source = resolve_model("tiny:llama")
    service = SplitService(Server(source, detect_arch(source.config()), wait_s=30, policies=POLICIES, max_cache_bytes=3 * ROW), None)
    server, port = serve_here(service)
    try:
        remote = train_remote(load_config(None, [*RUN, *extra]), tmp_path / "remote", 0, lambda i: GrpcChannel(f"grpc://127.0.0.1:{port}"))
    finally:
        server.stop(None)
    same_run(tmp_path / "local", tmp_path / "remote")
    keys = ("bytes_up", "bytes_down", "cache_hits", "cache_misses")
    assert [tuple(r[k] for k in keys) for r in rows(tmp_path / "local")] == [tuple(r[k] for k in keys) for r in rows(tmp_path / "remote")]
    assert remote["cache"]["max_bytes"] == 3 * ROW and remote["cache"]["evictions"] > 0 and remote["cache"]["resent"] == 0
    assert {k: v for k, v in local["cache"].items() if k != "bottom_s"} == {k: v for k, v in remote["cache"].items() if k != "bottom_s"}


def test_the_cache_turns_itself_off_where_it_cannot_be_exact(tmp_path):
    """The twin: a bottom that trains (and a lossy chain that varies, or dropout) has no cache, with the reason in the summary; a user who asked for one gets a warning."""
    with pytest.warns(SplittuneWarning, match="activation cache is off: segments.bottom is lora"):
        summary, out = run(tmp_path, "lora", "cuts=[1,3]", "segments.bottom=lora", "cache.max_bytes=1GB")
    assert summary["cache"]["on"] is False and summary["cache"]["hits"] == 0
    assert "segments.bottom is lora" in summary["cache"]["off_reason"]
    assert "cache_hits" not in rows(out)[-1]
    for extra, reason in [(["codec.up={name: int8, stochastic: true}"], "stochastic rounding"),
                          (["codec.up={name: int8, error_feedback: true}"], "error feedback"),
                          (["codec.up=topk"], "topk"),
                          (["train.model_dropout=true"], "model_dropout")]:
        client, *_ = build(load_config(None, [*RUN, "cuts=[1,3]", *extra]))
        assert client.cache is None and reason in client.cache_off, (extra, client.cache_off)
    client, *_ = build(load_config(None, [*RUN, "cuts=[1,3]", "codec.up=int8", "codec.down=int4"]))
    assert client.cache is not None  # deterministic, token by token: cached


def test_eviction_resends_the_least_recently_used_and_stays_exact(tmp_path):
    """Padded instruction data (a batch is as long as its longest row) in a cache too small for it: the least
    recently used rows go, their samples cross again, micro-batches mix cached and sent rows, and the run is
    still exact."""
    data = ["data.source=builtin:sentiment", "data.max_documents=40", "data.max_eval_examples=4", "train.seq_len=320",
            "train.steps=8", "cuts=[1,3]"]
    cached, on = run(tmp_path, "small", *data, "cache.max_bytes=250kB")  # room for some four of the rows (64 kB each at 250 tokens)
    run(tmp_path, "off", *data, "cache.max_bytes=0")
    same_run(on, tmp_path / "off")
    c = cached["cache"]
    assert c["evictions"] > 0 and c["hits"] > 0 and c["misses"] > 4 and c["resent"] == 0
    assert any(r["cache_hits"] == 1 for r in rows(on))  # a micro-batch with one row cached, one sent


def test_a_server_that_lost_its_cache_gets_every_row_again(tmp_path, monkeypatch):
    """Divergence: the server forgets what it held; the client's next micro-batches are refused with the miss
    status, resent whole, both caches start afresh, and the run is still exact."""
    servers = []
    real_init, real_step = Server.__init__, Client.train_step

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        servers.append(self)

    def train_step(self, step, batches):
        if step == 4:
            servers[0].group.members[0].cache.clear()
        return real_step(self, step, batches)

    monkeypatch.setattr(Server, "__init__", init)
    monkeypatch.setattr(Client, "train_step", train_step)
    cached, on = run(tmp_path, "lost", "cuts=[1,3]", "train.micro_batches=2")
    monkeypatch.undo()
    run(tmp_path, "off", "cuts=[1,3]", "train.micro_batches=2", "cache.max_bytes=0")
    same_run(on, tmp_path / "off")
    c = cached["cache"]
    assert c["resent"] == 2  # step 4's two micro-batches, one row each, and no refusal after: in step again
    assert sum(r["cache_hits"] for r in rows(on)[4:]) > 0  # what was resent is cached again


def test_malformed_cache_meta_is_refused_and_the_server_keeps_serving():
    client, server, link, _ = build(load_config(None, [*RUN, "cuts=[1,3]"]))
    key = "0" * 32
    mask = torch.ones(2, 8, dtype=torch.long)
    hidden = torch.randn(1, 8, 64)

    def refused(meta, tensors=None, match="", code="INVALID_ARGUMENT"):
        tensors = {"attention_mask": mask, "hidden": hidden} if tensors is None else tensors
        with pytest.raises(RemoteError, match=match) as err:
            client._call("activations", 1, 0, tensors, train=True, cache=meta)
        assert err.value.code == code, err.value

    refused({"keys": ["xyz", key], "sent": [0]}, match="a key is 32 lowercase hex digits")
    refused({"keys": [key, key], "sent": [2]}, match="'cache': sent must list increasing row indices in 0..1")
    refused({"keys": [key, key], "sent": [1, 0]}, match="increasing")
    refused({"keys": [key], "sent": [0]}, match="'cache.keys' has 1 keys, but the attention mask has shape")
    refused({"keys": [key, key], "sent": [0, 1]}, match="tensor 'hidden' has shape")
    refused({"keys": [key, key], "sent": []}, match="all cached")
    refused({"keys": [key, key], "sent": [0], "extra": 1}, match="unknown meta field")
    refused({"keys": [key, "1" * 32], "sent": [0]}, match="activation cache miss.*rows \\[1\\]", code=CACHE_MISS)
    with pytest.raises(RemoteError, match="training forwards only"):
        client._call("activations", 0, 0, {"attention_mask": mask, "hidden": hidden}, train=False, cache={"keys": [key, key], "sent": [0]})
    assert len(server.group.members[0].cache) == 0  # a refusal stores nothing
    ids = torch.randint(0, 200, (2, 32))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "sample_id": torch.tensor([0, 1])}
    assert client.train_step(1, [batch]).loss > 0 and client.train_step(2, [batch]).loss > 0
    assert client.cache.counts["hits"] == 2 and len(server.group.members[0].cache) == 2


def test_resume_with_the_cache_is_exact(tmp_path, monkeypatch):
    """The server's cache is in its checkpoint, the client's mirror (and its secret) in the client's."""
    extra = ["cuts=[1,3]", "train.checkpoint_every=2"]
    whole, _ = run(tmp_path, "whole", *extra)
    resumed, _ = killed_then_resumed(monkeypatch, 5, lambda: run(tmp_path, "cut", *extra))
    same_run(tmp_path / "whole", tmp_path / "cut")
    assert [(r["bytes_up"], r["cache_hits"]) for r in rows(tmp_path / "whole")] == \
           [(r["bytes_up"], r["cache_hits"]) for r in rows(tmp_path / "cut")]
    assert {k: v for k, v in whole["cache"].items() if k != "bottom_s"} == {k: v for k, v in resumed["cache"].items() if k != "bottom_s"}
    assert rows(tmp_path / "cut")[5]["cache_misses"] == 0  # step 6 found its rows in the restored cache


def test_the_lru_order_is_the_same_on_both_ends():
    """The mirror and the server take the same operations, so they evict the same rows."""
    server, mirror = ActivationCache(3 * 10), ActivationCache(3 * 10)
    keys = [f"{i:032x}" for i in range(5)]
    for batch in ([0, 1], [2, 0], [3, 4], [0, 2], [4, 1]):
        ks = [keys[i] for i in batch]
        sent = mirror.missing(ks)
        assert sent == server.missing(ks)
        mirror.take(ks, sent, 10)
        server.take(ks, sent, 10, [torch.full((1,), float(batch[i])) for i in sent])
        assert mirror.order() == server.order()
    # by hand: [0 1] → [1 0 2] → [2 3 4] → [4 2 0] → [0 4 1], each put past three rows evicting the oldest
    assert [k for k, _ in server.order()] == [keys[0], keys[4], keys[1]] and server.counts["evictions"] == 4
    assert torch.equal(server.row(keys[1]), torch.full((1,), 1.0))
