"""Each party's peak memory, measured with each party in its own process, as in a deployment.

In-process both parties share one address space, so their memory cannot be told apart; here the client
is ``splittune train --server`` and the server ``splittune serve``, both on loopback, for a few steps of
the entry's own config. The peak resident set of each process is its own high-water mark
(``device.peak_rss``: the client reports it in ``summary.json`` at the end of its run, the server in its
health answer, read before it is stopped); on a GPU both also report torch's peak allocation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..config import RunConfig, dump_config
from ..deploy.service import health
from .measure import start_server


def party_memory(cfg: RunConfig, steps: int, threads: int, workdir: Path, server_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Peak memory of the client and (when the run has one) the server over ``steps`` steps of ``cfg``, and the
    client's median step time (``server_args``: more ``splittune serve`` flags, e.g. ``--device cuda``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    t = cfg.train.model_copy(update={"steps": steps, "eval_batches": 1, "threads": threads, "checkpoint_every": 0})
    quiet_link = cfg.link.model_copy(update={"bandwidth_mbps": None, "up_mbps": None, "down_mbps": None, "latency_ms": 0.0})
    (workdir / "config.yaml").write_text(dump_config(cfg.model_copy(update={"train": t, "link": quiet_link})))
    command = [sys.executable, "-m", "splittune.cli", "train", "--config", str(workdir / "config.yaml"), "--out", str(workdir / "run")]
    server = None
    if cfg.mode != "centralized":
        url, server = start_server(cfg.model, threads, server_args)
        command += ["--server", url]
    try:
        with open(workdir / "client.log", "w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=3600).returncode
        out: dict[str, Any] = {}
        if server is not None:
            peak = health(url)["peak_memory"]  # the run is over: the server's high-water marks are its peaks
            out["server_peak_rss"] = peak["rss_bytes"]
            if peak.get("device_bytes"):
                out["server_peak_device"] = peak["device_bytes"]
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    if code != 0:
        tail = (workdir / "client.log").read_text(errors="replace")[-600:]
        raise RuntimeError(f"the memory run of {cfg.model} failed (exit {code}): {tail}")
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    peak = summary["peak_memory"]
    out["client_peak_rss"] = peak["rss_bytes"]
    out["step_s"] = summary["step_s_median"]
    if peak.get("device_bytes"):
        out["client_peak_device"] = peak["device_bytes"]
    return out
