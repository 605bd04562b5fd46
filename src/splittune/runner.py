"""One run, in-process: every stage of DESIGN.md's pipeline in order, and the run directory.

``mode: split`` builds a client and a server joined by the local channel; ``mode: centralized``
runs the same client code with the whole model and no channel — the baseline shares everything else.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from . import __version__
from .channels import LocalChannel
from .config import RunConfig, dump_config
from .data import build_task
from .eval import evaluate
from .models.arch import detect_arch
from .models.zoo import resolve_model
from .parties import Client, Party, Server, SessionSpec
from .report.plots import plot_loss

ADAPTERS = "adapters"


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


def build(cfg: RunConfig) -> tuple[Client, Server | None, LocalChannel | None, Any]:
    """Stage 0: resolve the model, plan the split, build the parties and connect them."""
    source = resolve_model(cfg.model)
    config = source.config()
    spec = detect_arch(config)
    session = SessionSpec.from_run(cfg, source.fingerprint(), spec.model_type)
    party = Party("client", source, spec, session, config)
    server = channel = None
    if party.plan.shape != "centralized":
        server = Server(source, spec, config)
        channel = LocalChannel(server.handle)
    client = Client(party, channel)
    client.connect()
    return client, server, channel, source


def train(cfg: RunConfig, out: Path, progress: Callable | None = None) -> dict[str, Any]:
    """Run ``cfg`` and write its run directory; returns the summary.

    ``progress(step, total, info)`` is called after every step (the CLI draws a progress bar with it).
    """
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    set_seed(cfg.seed)
    client, server, channel, source = build(cfg)
    tokenizer = source.tokenizer()
    task = build_task(cfg.data, tokenizer, cfg.train.seq_len, cfg.seed)
    t = cfg.train

    def run_eval(step: int) -> dict[str, Any]:
        up0, down0 = (channel.bytes_up, channel.bytes_down) if channel else (0, 0)
        result = {"step": step, **evaluate(client, task, t.batch_size, t.eval_batches)}
        if channel:  # evaluation traffic is reported, but kept out of the training byte counts
            result["bytes_up"], result["bytes_down"] = channel.bytes_up - up0, channel.bytes_down - down0
        return result

    before = run_eval(0)
    evals = [before]
    sampler = iter(task.sampler(t.batch_size, cfg.seed))
    metrics: list[dict[str, Any]] = []
    train_bytes = [0, 0]
    with open(out / "metrics.jsonl", "w") as log:
        for step in range(1, t.steps + 1):
            micro = [task.collate([task.train[i] for i in next(sampler)]) for _ in range(t.grad_accum)]
            up0, down0 = (channel.bytes_up, channel.bytes_down) if channel else (0, 0)
            t0 = time.perf_counter()
            result = client.train_step(step, micro)
            step_s = time.perf_counter() - t0
            up = channel.bytes_up - up0 if channel else 0
            down = channel.bytes_down - down0 if channel else 0
            train_bytes[0] += up
            train_bytes[1] += down
            row = {"step": step, "loss": result.loss, "lr": result.lr, "tokens": result.tokens,
                   "bytes_up": up, "bytes_down": down, "step_s": round(step_s, 6)}
            metrics.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if t.eval_every and step % t.eval_every == 0 and step != t.steps:
                evals.append(run_eval(step))
            if progress:
                progress(step, t.steps, row)
    after = run_eval(t.steps)
    evals.append(after)
    with open(out / "evals.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in evals)

    save_adapters(out / ADAPTERS, client, cfg)
    plot_loss(metrics, evals, out / "loss.png", f"{cfg.model} · {client.plan.shape} · cuts {cfg.cuts}")
    server_info = client.server_info
    step_times = [m["step_s"] for m in metrics]
    summary = {
        "mode": cfg.mode,
        "shape": client.plan.shape,
        "model": cfg.model,
        "cuts": list(cfg.cuts),
        "steps": t.steps,
        "seed": cfg.seed,
        "task": task.kind,
        "train_examples": len(task.train),
        "eval_examples": len(task.eval),
        "train_loss_first": metrics[0]["loss"],
        "train_loss_last": metrics[-1]["loss"],
        "eval_loss_before": before["loss"],
        "eval_loss_after": after["loss"],
        "eval_ppl_before": before["ppl"],
        "eval_ppl_after": after["ppl"],
        "bytes_up": train_bytes[0],
        "bytes_down": train_bytes[1],
        "eval_bytes_up": sum(e.get("bytes_up", 0) for e in evals),
        "eval_bytes_down": sum(e.get("bytes_down", 0) for e in evals),
        "wall_s": round(time.perf_counter() - started, 3),
        "step_s_mean": sum(step_times) / len(step_times),
        "step_s_median": sorted(step_times)[len(step_times) // 2],
        "client_params": client.party.weights.params,
        "client_bytes": client.party.weights.bytes,
        "client_trainable": client.party.trainable_params,
        "server_params": server_info.get("params", 0),
        "server_bytes": server_info.get("bytes", 0),
        "server_trainable": server_info.get("trainable", 0),
        "versions": {"splittune": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    if "accuracy" in before:
        summary["eval_accuracy_before"] = before["accuracy"]
        summary["eval_accuracy_after"] = after["accuracy"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_adapters(folder: Path, client: Client, cfg: RunConfig) -> None:
    """Each party's trainable tensors, under the unsplit model's names, in safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"client": client.party.state(), "server": client.server_state()}
    manifest = {"model": cfg.model, "cuts": list(cfg.cuts), "shape": client.plan.shape,
                "segments": cfg.segments.model_dump(), "lora": cfg.lora.model_dump(), "files": {},
                "fan_in_fan_out": bool(client.party.fan_in_fan_out or client.server_info.get("fan_in_fan_out"))}
    for party, state in parts.items():
        if state:
            save_file(state, str(folder / f"{party}.safetensors"), metadata={"party": party, "format": "splittune-adapter"})
            manifest["files"][party] = {"file": f"{party}.safetensors", "tensors": len(state), "params": sum(v.numel() for v in state.values())}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
