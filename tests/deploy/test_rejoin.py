"""A killed client of a several-client run rejoins (issue 23): restarted with its same command, it replaces its stale
session, every other client goes back to the step it rejoined at, and the finished run equals an undisturbed one.
Separate client processes against one ``splittune serve`` process, as deployed."""

import json
import subprocess
import time

import pytest
from safetensors.torch import load_file

from splittune.config import load_config
from splittune.run import CHECKPOINTS, train

from served import CLI, Served, sets
from configs import tiny

RUN = tiny("cuts=[1,3]", "train.steps=4", "data.max_documents=8", "train.eval_every=0", "train.lr=0.01",
           "train.warmup_steps=0", "train.checkpoint_every=1")
# sfl-v1 with secure aggregation and a defense (the same secret gives the same noise in every process, the masked sum is
# the same sum); sfl-v2's rejoin runs in tests/engines/test_ray.py (a killed Ray client worker rejoins the same way); the
# sequential relay resumes exactly in tests/run/test_resume.py (one case here keeps the suite within its time)
CASES = {
    "sfl-v1-secure": ["clients=3", "schedule=sfl-v1", "aggregate_every=1", "secure_aggregation=true",
                      "defense=[{name: gaussian, sigma: 0.3, clip: 0.5}]", "defense_seed=5"],
}


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _adapters(out):
    return {f"{p.parent.name}/{p.name}/{k}": v for p in sorted((out / "adapters").rglob("*.safetensors"))
            for k, v in load_file(p).items()}


def _latest(out):
    pointer = out / CHECKPOINTS / "client" / "latest"
    try:
        return int(pointer.read_text())
    except (OSError, ValueError):
        return 0


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_client_rejoins_and_the_run_equals_an_undisturbed_one(tmp_path, case):
    run = [*RUN, *CASES[case]]
    n = load_config(None, run).clients
    served = Served(tmp_path / "serve.log", "--state", str(tmp_path / "state"), "--wait", "120")

    def client(i):
        return subprocess.Popen([*CLI, "train", *sets(run), "--server", served.url, "--client-index", str(i),
                                 "--client-id", f"c{i}", "--out", str(tmp_path / f"c{i}")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    try:
        procs = [client(i) for i in range(n)]
        victim = n - 1
        deadline = time.time() + 120
        while _latest(tmp_path / f"c{victim}") < 2 and procs[victim].poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert procs[victim].poll() is None, procs[victim].communicate()[0]
        procs[victim].kill()  # mid-run, while the others train or wait for it
        procs[victim].wait()
        procs[victim] = client(victim)  # the same command
        outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        served.stop()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out
    for i in range(n - 1):  # every other client was told, and went back to where the restarted one came in
        assert f"client {victim} of this run restarted and rejoined it from its checkpoint at step" in outputs[i], outputs[i]
    assert '"event": "rejoin"' in (tmp_path / "serve.log").read_text()

    train(load_config(None, run), tmp_path / "whole")
    whole = _losses(tmp_path / "whole")
    for i in range(n):
        want = [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "whole/metrics.jsonl").read_text().splitlines())
                if r["client"] == i]
        assert [s for s, _ in _losses(tmp_path / f"c{i}")] == [s for s, _ in want]
        assert [loss for _, loss in _losses(tmp_path / f"c{i}")] == pytest.approx([loss for _, loss in want], abs=1e-6)
    assert whole
    want = _adapters(tmp_path / "whole")
    for i in range(n):
        got = {k: v for k, v in _adapters(tmp_path / f"c{i}").items() if k.startswith((f"client{i}/", "adapters/global"))}
        assert got, f"client {i} wrote no adapters"
        assert max(float((got[k] - want[k]).abs().max()) for k in got) < 1e-6
