"""Exact resume: a run stopped at any step and started again with the same command ends exactly like a
run that was never stopped (losses, adapters, byte counts), in-process and across killed processes."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from splittune.config import ConfigError, load_config
from splittune.run import train
from configs import tiny
from interrupt import crash_at

RUN = tiny("cuts=[1,3]", "train.steps=6", "data.max_documents=6", "train.lr=0.01", "train.warmup_steps=1",
           "train.checkpoint_every=2", "train.eval_every=2")


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapters(out, names=("client", "server")):
    state = {}
    for name in names:
        state.update(load_file(out / f"adapters/{name}.safetensors"))
    return state


def same_run(a, b, names=("client", "server")):
    ra, rb = rows(a), rows(b)
    assert [(r["step"], r["client"], r["loss"], r["bytes_up"], r["bytes_down"]) for r in ra] == \
           [(r["step"], r["client"], r["loss"], r["bytes_up"], r["bytes_down"]) for r in rb]
    sa, sb = adapters(a, names), adapters(b, names)
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    ea, eb = (json.loads((x / "summary.json").read_text()) for x in (a, b))
    for key in ("eval_loss_before", "eval_loss_after", "bytes_up", "bytes_down", "train_loss_last"):
        assert ea[key] == eb[key], key


@pytest.mark.parametrize("extra", [[], ["clients=2", "schedule=sfl-v1"], ["clients=2", "schedule=sfl-v2", "client_overrides={1: {lora: {rank: 2}}}"],
                                   ["clients=3", "schedule=sequential", "aggregate_every=2"], ["clients=2", "mode=federated"],
                                   ["codec.up={name: topk, fraction: 0.3}", "codec.down={name: topk, fraction: 0.3}", "train.micro_batches=2"],
                                   ["defense=[{name: gaussian, sigma: 0.3, clip: 0.2}, {name: dx, epsilon: 500}]", "defense_seed=7",
                                    "dp_sgd={noise_multiplier: 0.5, max_grad_norm: 0.1}"]],
                         ids=["one-client", "sfl-v1", "sfl-v2-heterogeneous", "sequential", "federated", "topk-error-feedback",
                              "defense-noise"])
def test_in_process_resume_is_exact(tmp_path, monkeypatch, extra):
    """Every schedule; and a stateful chain (top-k's error feedback on both ends, carried in the checkpoint)."""
    cfg = load_config(None, [*RUN, *extra])
    names = ("client", "server") if not extra or "schedule=sequential" in extra or extra[0].startswith(("codec", "defense")) else ("global",)
    train(cfg, tmp_path / "whole")
    with monkeypatch.context() as m:
        crash_at(m, 5)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "cut")
    assert (tmp_path / "cut/checkpoint/client/latest").read_text() == "4"
    train(cfg, tmp_path / "cut")
    same_run(tmp_path / "whole", tmp_path / "cut", names)


def test_resume_refuses_another_config(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        crash_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train(load_config(None, RUN), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"holds a checkpoint \(step 2\) of another config \(train.lr: 0.01 there, 0.02 now\)"):
        train(load_config(None, [*RUN, "train.lr=0.02"]), tmp_path / "run")


def test_a_finished_run_continues_with_more_steps_and_only_that(tmp_path):
    from splittune.config import SplittuneWarning

    short = [*RUN, "train.steps=4", "train.checkpoint_every=0", "train.eval_every=0"]
    train(load_config(None, short), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"train.steps: 4 there, 6 now; train.lr: 0.01 there, 0.02 now"):
        train(load_config(None, [*short, "train.steps=6", "train.lr=0.02"]), tmp_path / "run")  # the twin: more than steps
    with pytest.warns(SplittuneWarning, match=r"continuing .* from step 4 to step 6 \(it was set to 4\)"):
        summary = train(load_config(None, [*short, "train.steps=6"]), tmp_path / "run")
    assert summary["steps"] == 6 and [r["step"] for r in rows(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ConfigError, match=r"train.steps: 6 there, 5 now"):  # fewer steps than it took: nothing to continue
        train(load_config(None, [*short, "train.steps=5"]), tmp_path / "run")


CLI = [sys.executable, "-m", "splittune.cli"]


def test_killed_client_and_server_processes_resume_exactly(tmp_path):
    """SIGKILL the client at a random step, then the server at a random step; restart each with the same
    command; the finished run equals an uninterrupted one."""
    from served import free_port

    rng = random.Random(1)
    run = [*RUN, "train.steps=8", "train.checkpoint_every=1"]
    sets = [a for item in run for a in ("--set", item)]
    port = free_port()
    url = f"grpc://127.0.0.1:{port}"
    serve = [*CLI, "serve", "--model", "tiny:llama", "--listen", f"127.0.0.1:{port}", "--state", str(tmp_path / "state")]
    client = [*CLI, "train", *sets, "--server", url, "--out", str(tmp_path / "remote")]

    def start_server():
        proc = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "a"))
        from splittune.deploy.service import health

        for _ in range(300):
            try:
                health(url, timeout_s=1)
                return proc
            except Exception:
                time.sleep(0.1)
        raise RuntimeError((tmp_path / "serve.log").read_text())

    def steps_done():
        path = tmp_path / "remote/metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def run_until(proc_to_kill, at):
        proc = subprocess.Popen(client, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while steps_done() < at and proc.poll() is None:
            time.sleep(0.02)
        victim = proc if proc_to_kill == "client" else server
        assert victim.poll() is None, "the run ended before it could be killed"
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        proc.wait(timeout=60)  # a client whose server died exits with an error
        assert steps_done() < 8

    server = start_server()
    run_until("client", rng.randint(2, 3))
    run_until("server", rng.randint(5, 6))
    server = start_server()
    final = subprocess.run(client, capture_output=True, text=True, timeout=300)
    server.terminate()
    server.wait(timeout=30)
    assert final.returncode == 0, final.stdout + final.stderr
    train(load_config(None, run), tmp_path / "whole")
    same_run(tmp_path / "whole", tmp_path / "remote")


def test_sigterm_stops_after_the_step_with_a_checkpoint(tmp_path):
    run = [*RUN, "train.steps=40", "train.checkpoint_every=0", "train.eval_every=0"]
    sets = [a for item in run for a in ("--set", item)]
    command = [*CLI, "train", *sets, "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run/metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "run the same command to resume" in " ".join(err.split())
    stopped = int((tmp_path / "run/checkpoint/client/latest").read_text())
    assert 3 <= stopped < 40
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    train(load_config(None, run), tmp_path / "whole")
    same_run(tmp_path / "whole", tmp_path / "run")


def test_error_feedback_state_is_what_makes_a_topk_resume_exact(tmp_path, monkeypatch):
    """The twin: drop the chain state from the checkpoint and the resumed top-k run drifts from the whole one."""
    import splittune.run.loop as runner  # where train looks them up

    cfg = load_config(None, [*RUN, "codec.up={name: topk, fraction: 0.3}", "codec.down={name: topk, fraction: 0.3}"])
    train(cfg, tmp_path / "whole")
    with monkeypatch.context() as m:
        crash_at(m, 5)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "cut")
    monkeypatch.setattr(runner, "saved_link_states", lambda out, step: {})
    train(cfg, tmp_path / "cut")
    later = [r["loss"] for r in rows(tmp_path / "cut") if r["step"] > 4]
    assert later != [r["loss"] for r in rows(tmp_path / "whole") if r["step"] > 4]


def test_a_stop_request_leaves_an_evaluation_at_once(tmp_path):
    """Evaluations can take minutes: a stop request ends them at the next batch. Before the first step there is
    nothing to save; during a mid-run evaluation the step's checkpoint is saved and the same call finishes the run."""
    from splittune.run import STOP, Interrupted

    def stop_at(label):
        def progress(done, total, row):
            if row.get("phase") == "eval" and row["label"] == label:
                STOP.set()
        return progress

    cfg = load_config(None, [*RUN, "train.steps=4", "train.checkpoint_every=0", "train.eval_every=2", "train.eval_batches=2"])
    try:
        with pytest.raises(Interrupted, match="before the first step"):
            train(cfg, tmp_path / "early", progress=stop_at("before training"))
        assert not (tmp_path / "early" / "checkpoint" / "client" / "latest").exists()
        STOP.clear()
        with pytest.raises(Interrupted, match="stopped after step 2"):
            train(cfg, tmp_path / "mid", progress=stop_at("at step 2"))
        assert (tmp_path / "mid" / "checkpoint" / "client" / "latest").read_text() == "2"
    finally:
        STOP.clear()
    assert train(cfg, tmp_path / "mid")["steps"] == 4  # the twin: without a request the same call runs to the end
