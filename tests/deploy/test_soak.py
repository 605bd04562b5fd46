"""Soak (issue 23): four client processes train one run while, on the same server, a fuzzer sends mutated frames,
frames that are a few bytes on the wire and hundreds of MiB decoded, and half-sent frames, and idle streams hold
connections open. Every client's adapters equal the undisturbed run's, ``Health`` always answers, and the server's
memory stays within a bound the decoded-size bombs alone would break."""

import json
import random
import subprocess
import threading
import time
from collections import Counter

import grpc
import pytest
import torch
from safetensors.torch import load_file

from splittune.channels.transport import MORE, SESSION_METHOD, chunks
from splittune.config import load_config
from splittune.deploy.service import health
from splittune.run import train
from splittune.wire import Message, encode_frame

from hostile import topk_frame
from served import CLI, Served, sets
from configs import tiny

RUN = tiny("cuts=[1,3]", "clients=4", "schedule=sfl-v1", "aggregate_every=2", "train.steps=2", "data.max_documents=8",
           "train.eval_every=0", "train.lr=0.01", "train.warmup_steps=0")
BOMB_ROWS = 32768  # a top-k hidden state of [32768, 32, 64] float32: 256 MiB decoded, a few hundred bytes sent
MEMORY_BOUND = 160 << 20  # the server's peak may grow this much over its size at start (one bomb decoded is 256 MiB)


def _kib(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) << 10
    raise KeyError(field)


def _adapters(out):
    return {f"{p.parent.name}/{p.name}/{k}": v for p in sorted((out / "adapters").rglob("*.safetensors"))
            for k, v in load_file(p).items()}


def _losses(out, client=None):
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in rows if client is None or r["client"] == client]


def test_four_clients_train_through_a_fuzzer_bombs_and_idle_streams(tmp_path, mutate):
    served = Served(tmp_path / "serve.log", "--max-frame-mb", "1", "--wait", "120")
    target = served.url.removeprefix("grpc://")
    start_rss = _kib(served.proc.pid, "VmRSS")
    stop, codes, failures = threading.Event(), Counter(), []
    rng = random.Random(0)

    def stub():
        return grpc.insecure_channel(target).stream_stream(SESSION_METHOD, request_serializer=None, response_deserializer=None)

    def idle():  # connects and never sends a byte until the run is over
        stop.wait()
        yield from ()

    idle_calls = [stub()(idle()) for _ in range(16)]
    templates = [encode_frame(Message("activations", "stranger", 1, 0, {"hidden": torch.randn(2, 8, 64),
                                                                       "attention_mask": torch.ones(2, 8, dtype=torch.long)}, {"train": True})),
                 encode_frame(Message("step", "stranger", 1, 0, meta={"sq_norm": 1.0})),
                 topk_frame("activations", "stranger", rows=2)]

    def fuzz():
        i = 0
        while not stop.is_set():
            i += 1
            if i % 5 == 0:  # a bomb: a hello whose top-k payload is empty and names 256 MiB
                parts = list(chunks(topk_frame("hello", f"bomb-{i}", rows=BOMB_ROWS, empty=True, meta={}), 4096))
            elif i % 5 == 1:  # half a frame, then the stream ends
                parts = [bytes([MORE]) + bytes(4) + bytes(1000)]
            else:
                parts = list(chunks(bytes(mutate(bytearray(rng.choice(templates)), rng, rng.randint(1, 6), 64)), 97))
            try:
                for _ in stub()(iter(parts), timeout=10):
                    pass
                codes["OK"] += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1
            time.sleep(0.01)

    def probe():
        while not stop.is_set():
            try:
                health(served.url, timeout_s=5)
            except Exception as err:  # noqa: BLE001
                failures.append(repr(err))
            time.sleep(0.2)

    threads = [threading.Thread(target=fuzz, daemon=True), threading.Thread(target=probe, daemon=True)]
    try:
        for t in threads:
            t.start()
        procs = [subprocess.Popen([*CLI, "train", *sets(RUN), "--server", served.url, "--client-index", str(i), "--client-id",
                                   f"c{i}", "--out", str(tmp_path / f"c{i}")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(4)]
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
        peak = _kib(served.proc.pid, "VmHWM")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        for call in idle_calls:
            call.cancel()
        served.stop()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out
    assert not failures, failures[:3]
    assert codes["INVALID_ARGUMENT"] >= 20 and not codes["INTERNAL"] and not codes["UNKNOWN"], codes
    assert peak - start_rss < MEMORY_BOUND, f"the server grew from {start_rss >> 20} MiB to a peak of {peak >> 20} MiB"
    log = (tmp_path / "serve.log").read_text()
    assert "would decode to 268435456 bytes" in log  # the bombs were refused for what they would take

    train(load_config(None, RUN), tmp_path / "whole")
    want = _adapters(tmp_path / "whole")
    for i in range(4):
        assert [s for s, _ in _losses(tmp_path / f"c{i}")] == [s for s, _ in _losses(tmp_path / "whole", i)]
        assert [v for _, v in _losses(tmp_path / f"c{i}")] == pytest.approx([v for _, v in _losses(tmp_path / "whole", i)], abs=1e-6)
        got = {k: v for k, v in _adapters(tmp_path / f"c{i}").items() if k.startswith((f"client{i}/", "adapters/global"))}
        assert got and max(float((got[k] - want[k]).abs().max()) for k in got) < 1e-6
