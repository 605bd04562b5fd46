"""engine: ray: the server's trunk in a Ray actor, reached by Ray channels carrying the very frames of the local and
gRPC channels: a run on Ray equals the in-process run bit for bit (losses, adapters, bytes), for every schedule."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from splittune.channels.base import RemoteError
from splittune.config import ConfigError, load_config
from splittune.parties.client.pipeline import Client
from splittune.engines.ray import RayEngineError, RayServer, _reachable, start
from splittune.run import train
from configs import owners, tiny
from interrupt import killed_then_resumed

ray = pytest.importorskip("ray")

RUN = tiny("cuts=[1,3]", "train.steps=2", "data.max_documents=16", "train.lr=0.01", "train.warmup_steps=0")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (starting one takes seconds)."""
    started = start(None)
    yield ray
    if started:
        ray.shutdown()


def steady(out):
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapters(out):
    return {f.name: load_file(f) for f in sorted((out / "adapters").glob("*.safetensors"))}


@pytest.mark.parametrize("extra", [["clients=8", "schedule=sfl-v2"], ["clients=3", "schedule=sfl-v1", "aggregate_every=2"],
                                   ["clients=3", "schedule=sequential"]], ids=["sfl-v2-8-clients", "sfl-v1", "sequential"])
def test_a_run_on_ray_equals_the_in_process_run(tmp_path, cluster, extra):
    local = train(load_config(None, [*RUN, *extra]), tmp_path / "local")
    on_ray = train(load_config(None, [*RUN, *extra, "engine=ray"]), tmp_path / "ray")
    assert steady(tmp_path / "ray") == steady(tmp_path / "local")  # losses, learning rates, bytes each way, step by step
    a, b = adapters(tmp_path / "ray"), adapters(tmp_path / "local")
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    assert (on_ray["bytes_up"], on_ray["bytes_down"], on_ray["eval_loss_after"]) == \
           (local["bytes_up"], local["bytes_down"], local["eval_loss_after"])
    assert on_ray["server_params"] == local["server_params"] > 0  # the actor holds the trunk
    deadline = time.monotonic() + 30  # the actor was killed at the end; the cluster takes its CPU back asynchronously
    while cluster.available_resources().get("CPU", 0) < cluster.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.available_resources().get("CPU", 0) == cluster.cluster_resources()["CPU"]


def test_a_sampled_run_on_ray_resumes_exactly_from_its_checkpoint(tmp_path, cluster, monkeypatch):
    """The actor keeps the server's part of each checkpoint where the run directory says (a local cluster shares it);
    killed and resumed on Ray, a sampled two-part run ends as the undisturbed in-process run does."""
    run = [*RUN, "clients=4", "clients_per_round=2", "cuts=[2]", "train.steps=4", "train.checkpoint_every=2"]
    train(load_config(None, run), tmp_path / "local")
    starts = []
    on_ray = lambda: train(load_config(None, [*run, "engine=ray"]), tmp_path / "ray",  # noqa: E731
                           progress=lambda done, total, row: starts.append(row.get("resume")) if row.get("phase") == "start" else None)
    killed_then_resumed(monkeypatch, 3, on_ray)
    assert starts == [None, 2]  # the second run resumed from step 2's checkpoint (the actor's part of it included)
    assert steady(tmp_path / "ray") == steady(tmp_path / "local")
    a, b = adapters(tmp_path / "ray"), adapters(tmp_path / "local")
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


def test_a_server_actor_that_dies_mid_run_is_one_clear_error(tmp_path, cluster, monkeypatch):
    servers, real_init, real_step = [], RayServer.__init__, Client.train_step

    def init(self, *args):
        real_init(self, *args)
        servers.append(self)

    def step(self, s, batches):
        if s == 2:
            cluster.kill(servers[0].actor)
        return real_step(self, s, batches)

    monkeypatch.setattr(RayServer, "__init__", init)
    monkeypatch.setattr(Client, "train_step", step)
    with pytest.raises(RemoteError, match=r"the server's Ray actor is gone \(\w+Error: ") as caught:
        train(load_config(None, [*RUN, "engine=ray"]), tmp_path / "run")
    assert caught.value.code == "UNAVAILABLE"
    cfg = load_config(None, [*RUN, "engine=ray", "ray.server_resources={num_cpus: 64}"])
    with pytest.raises(RayEngineError, match=r"ray.server_resources asks for 64 CPUs and 0 GPUs, and the Ray cluster has \d+ CPUs"):
        RayServer(cfg.model, None, "cpu", cfg.ray.server_resources.model_dump())


def test_settings_ray_cannot_serve_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="mode: centralized has no server"):
        load_config(None, tiny("engine=ray", "mode=centralized"))
    with pytest.raises(ConfigError, match="engine: ray runs it in a Ray actor"):
        train(load_config(None, [*RUN, "engine=ray"]), tmp_path / "tapped", record_tap=("server",))


def test_an_address_nothing_listens_on_is_refused_at_once():
    """Ray itself would retry for minutes, logging all the while."""
    with pytest.raises(RayEngineError, match=r"cannot reach the Ray cluster at 127.0.0.1:1 \(.*\); start one with `ray start --head`"):
        _reachable("127.0.0.1:1")
    with pytest.raises(RayEngineError, match="is not HOST:PORT"):
        _reachable("my-cluster")


def _kill_when(folder, rows: int, killed: list) -> None:
    """SIGKILL the client worker writing ``folder`` once it has written ``rows`` client steps."""
    import os
    import signal

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        log = folder / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= rows and (folder / "pid").exists():
            pid = int((folder / "pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.05)


def test_a_hundred_clients_on_two_workers_survive_a_killed_worker_and_equal_the_in_process_run(tmp_path, cluster):
    """100 clients of the tiny model, 10 sampled a round, 3 rounds, on 2 client workers of the local cluster; worker 1's
    process is killed after the first round: Ray restarts it, its clients rerun from their checkpoint, every client
    goes back there, and the run ends exactly as the undisturbed in-process run (steps, bytes, adapters)."""
    import threading

    data = owners(tmp_path / "owners.jsonl")
    run = [*RUN, f"data.source={data}", "data.max_documents=200", "clients=100", "clients_per_round=10", "schedule=sfl-v2", "train.steps=3",
           "train.checkpoint_every=1"]
    local = train(load_config(None, run), tmp_path / "local")
    from splittune.schedules.sampling import Roster

    drawn = [Roster(100, 10, load_config(None, run).seed).of(r) for r in (1, 2, 3)]
    assert local["sampled"] == drawn and [sorted(r["client"] for r in steady(tmp_path / "local") if r["step"] == s)
                                          for s in (1, 2, 3)] == drawn  # each round trains its drawn clients

    first = sum(c % 2 for c in drawn[0])  # worker 1's clients in round 1
    killed: list = []
    threading.Thread(target=_kill_when, args=(tmp_path / "ray" / "workers" / "w1", first, killed), daemon=True).start()
    workers = ["engine=ray", "ray.client_workers=2", "ray.client_resources={num_cpus: 0.5}"]
    summary = train(load_config(None, [*run, *workers]), tmp_path / "ray")
    assert killed and int((tmp_path / "ray" / "workers" / "w1" / "pid").read_text()) != killed[0]  # rerun by a new process
    assert steady(tmp_path / "ray") == steady(tmp_path / "local")
    a, b = adapters(tmp_path / "ray"), adapters(tmp_path / "local")
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    assert [w["clients"] for w in summary["workers"]] == [list(range(0, 100, 2)), list(range(1, 100, 2))]
    assert all(w["peak_memory"]["rss_bytes"] < 2**31 for w in summary["workers"])  # 50 clients each, one frozen base


def test_client_workers_the_cluster_cannot_place_are_refused_at_once(tmp_path, cluster):
    cfg = load_config(None, [*RUN, "clients=4", "engine=ray", "ray.client_workers=4"])  # 4 workers of 1 CPU, and the server
    with pytest.raises(RayEngineError, match=r"ray.client_workers=4 workers of 1 CPUs and 0 GPUs and the server's actor "
                                             r"\(1 CPUs, 0 GPUs\) need 5 CPUs and 0 GPUs; the Ray cluster has 2 CPUs"):
        train(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="ray.client_workers=2 spreads the clients over Ray actors; it needs engine: ray"):
        load_config(None, [*RUN, "clients=4", "ray.client_workers=2"])


def test_a_trunk_in_two_span_actors_trains_as_the_trunk_in_one(tmp_path, cluster, monkeypatch):
    """The server's blocks [1, 3) as two span actors (block 1 in the trunk's actor, block 2 in another), the hidden state
    and its gradient handed between them: every step's loss, bytes and every adapter tensor as the in-process run's
    (the two-client run killed before step 3 and resumed: each span restores its own part of the checkpoint)."""
    run = [*RUN, "clients=2", "schedule=sfl-v2", "train.checkpoint_every=1", "train.steps=3"]
    train(load_config(None, run), tmp_path / "local")
    spans = ["engine=ray", "ray.trunk_spans=2", "ray.server_resources={num_cpus: 0.5}"]
    summary = killed_then_resumed(monkeypatch, 3, lambda: train(load_config(None, [*run, *spans]), tmp_path / "ray"))
    got, want = steady(tmp_path / "ray"), steady(tmp_path / "local")
    assert [(r["step"], r["client"], r["bytes_up"], r["bytes_down"]) for r in got] == \
           [(r["step"], r["client"], r["bytes_up"], r["bytes_down"]) for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5, abs=1e-6)
    a, b = adapters(tmp_path / "ray"), adapters(tmp_path / "local")
    assert a.keys() == b.keys() and all(torch.allclose(a[f][k], b[f][k], rtol=1e-4, atol=1e-6) for f in a for k in a[f])
    assert any("layers.2." in k for f in a for k in a[f])  # the second span's adapters came back with the first's
    assert summary["server_params"] > 0
    (saved,) = (tmp_path / "ray" / "checkpoint" / "server").glob("run-*/step-3/tensors.safetensors")
    keys = list(load_file(saved))  # block 2 is the second span's, checkpointed apart
    assert any(k.startswith("span1.") and "layers.2." in k for k in keys)
    assert not any(k.startswith(("state.", "optimizer.")) and "layers.2." in k for k in keys)  # not the first span's


def test_trunk_spans_the_split_cannot_take_are_refused():
    from splittune.parties.server.spans import bounds

    with pytest.raises(ConfigError, match=r"ray.trunk_spans=2 cuts the server's trunk into Ray actors: it needs engine: ray and a "
                                          r"U-shaped split \(cuts: \[a, b\]\)"):
        load_config(None, [*RUN, "cuts=[2]", "engine=ray", "ray.trunk_spans=2"])
    assert bounds(1, 3, 2) == [(1, 2), (2, 3)] and bounds(2, 29, 4) == [(2, 9), (9, 16), (16, 23), (23, 29)]
    with pytest.raises(ValueError, match=r"ray.trunk_spans=3 cannot cut the server's 2 block\(s\) \[1, 3\)"):
        bounds(1, 3, 3)


def test_progress_reads_only_what_a_worker_appended(tmp_path):
    from splittune.run.ray_clients import _tail

    log, state = tmp_path / "metrics.jsonl", [0, 0, None]
    log.write_text('{"step": 1}\n{"step"')  # a row being written waits for the next look
    assert _tail(log, state)[1:] == [1, {"step": 1}]
    log.write_text('{"step": 1}\n{"step": 2}\n')
    assert _tail(log, state)[1:] == [2, {"step": 2}] and state[0] == log.stat().st_size
    log.write_text('{"step": 1}\n')  # a resumed worker rewrote it: read again from the start
    assert _tail(log, state)[1:] == [1, {"step": 1}]
