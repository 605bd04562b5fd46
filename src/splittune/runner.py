"""One run, in-process: every stage of DESIGN.md's pipeline in order, and the run directory.

``mode: split`` builds the clients and a server joined by local channels; ``mode: centralized`` runs
the same client code with the whole model and no channel (the baseline shares everything else);
``mode: federated`` gives every client the whole model and uses the server only to average. Clients
run in threads, as they would run in processes: the server orders their requests (schedules/).
"""

from __future__ import annotations

import contextlib
import json
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from . import __version__, checkpoint
from .channels import Channel, LocalChannel
from .config import ConfigError, RunConfig, dump_config
from .data import TaskData, build_client_tasks, merge_tasks
from .device import resolve_device, rng_state, set_rng_state
from .eval import evaluate
from .models.arch import detect_arch
from .models.partition import PlanError
from .models.zoo import ModelSource, resolve_model
from .parties import Client, Party, Server, SessionSpec
from .report.plots import plot_loss
from .schedules.group import personal_names

ADAPTERS = "adapters"
STOP = threading.Event()  # set by a signal handler: finish the step, checkpoint, stop


class Interrupted(Exception):
    """A run stopped on request after ``step``, with a checkpoint to resume from."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}; the checkpoint is saved: run the same command to resume")
        self.step = step


CHECKPOINTS = "checkpoint"


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


@dataclass
class Fleet:
    """Everything a run trains with: its clients, the server they share, their channels."""

    clients: list[Client]
    server: Server | None  # None when the server is another process
    channels: list[Channel | None]
    source: ModelSource
    indices: list[int]  # each local client's index in the run (all of them in-process)

    def abort(self, err: BaseException) -> None:
        """A client failed: the server stops waiting for it, so the other clients fail fast instead of timing out."""
        if self.server is not None:
            self.server.cancel(f"a client failed: {err}")

    def bytes(self, i: int) -> tuple[int, int]:
        ch = self.channels[i]
        return (ch.bytes_up, ch.bytes_down) if ch else (0, 0)


def parallel(fn: Callable, items: list, on_error: Callable[[BaseException], None] | None = None) -> list:
    """``fn`` over ``items`` at once (clients of one round run concurrently, like separate machines).

    When one fails, ``on_error`` runs at once (to release the others waiting for it), then the first error is raised.
    """
    if len(items) == 1:
        return [fn(items[0])]
    with ThreadPoolExecutor(len(items)) as pool:
        futures = [pool.submit(fn, item) for item in items]
        failed = None
        for future in as_completed(futures):
            if future.exception() is not None and failed is None:
                failed = future.exception()
                if on_error is not None:
                    on_error(failed)
    if failed is not None:
        raise failed
    return [f.result() for f in futures]


def connect(cfg: RunConfig, source: ModelSource, samples: list[int], indices: list[int] | None = None,
            channel_for: Callable[[int], Channel] | None = None, resume: int | None = None, state_dir: Path | None = None) -> Fleet:
    """Stage 0: plan the split, build the parties, and say hello (the server forms the group).

    In-process, every client is built here with a local channel to a server built here too; a client
    process passes its own ``indices`` and ``channel_for`` (a gRPC channel to the server process).
    """
    config = source.config()
    spec = detect_arch(config)
    fingerprint = source.fingerprint()
    n = len(samples) if indices is None else (cfg.clients if cfg.mode != "centralized" else 1)
    indices = list(range(len(samples))) if indices is None else indices
    device = resolve_device(cfg.train.device)
    server = None
    if channel_for is None and cfg.mode != "centralized":
        server = Server(source, spec, config, state_dir=state_dir, device=device)
        channel_for = lambda i: LocalChannel(server.handle)  # noqa: E731
    clients, channels = [], []
    for i, count in zip(indices, samples, strict=True):
        session = SessionSpec.from_run(cfg, fingerprint, spec.model_type, i, count, clients=n)
        try:
            party = Party("client", source, spec, session, config, device=device)
        except (PlanError, ValueError) as err:
            raise type(err)(f"client {i}: {err}" if n > 1 else str(err)) from None
        channel = channel_for(i) if channel_for is not None and cfg.mode != "centralized" else None
        clients.append(Client(party, channel))
        channels.append(channel)
    fleet = Fleet(clients, server, channels, source, indices)
    parallel(lambda c: c.connect(resume), clients, fleet.abort)
    return fleet


def build(cfg: RunConfig) -> tuple[Client, Server | None, LocalChannel | None, ModelSource]:
    """A single-client run's parties (what tests and ``verify`` drive step by step)."""
    fleet = connect(cfg, resolve_model(cfg.model), [1])
    return fleet.clients[0], fleet.server, fleet.channels[0], fleet.source


def client_tasks(cfg: RunConfig, tokenizer) -> list[TaskData]:
    """Each client's data; the centralized baseline trains on all of it pooled."""
    tasks = build_client_tasks(cfg, tokenizer)
    return [merge_tasks(tasks)] if cfg.mode == "centralized" and len(tasks) > 1 else tasks


@contextlib.contextmanager
def global_view(client: Client, global_state: dict[str, torch.Tensor], personal: set[str]):
    """Client 0 with its personal segments replaced by their average: the global model, for evaluation."""
    arch = client.party.spec
    own = client.party.state()
    keep = personal_names(own, client.plan, personal, arch) & set(global_state)
    if not keep:
        yield client
        return
    client.party.load_state({k: global_state[k] for k in keep})
    try:
        yield client
    finally:
        client.party.load_state({k: own[k] for k in keep})


def train(cfg: RunConfig, out: Path, progress: Callable | None = None) -> dict[str, Any]:
    """Run ``cfg`` and write its run directory; returns the summary.

    ``progress(done, total, info)`` is called after every client step (the CLI draws a progress bar with it).
    """
    started = time.perf_counter()
    resume = prepare_run_dir(cfg, out)
    set_seed(cfg.seed)
    source = resolve_model(cfg.model)
    tasks = client_tasks(cfg, source.tokenizer())
    pooled = merge_tasks(tasks) if len(tasks) > 1 else tasks[0]
    fleet = connect(cfg, source, [len(task.train) for task in tasks], resume=resume, state_dir=out / CHECKPOINTS / "server")
    return Session(cfg, fleet, tasks, pooled, out, progress, started, resume).run()


def prepare_run_dir(cfg: RunConfig, out: Path) -> int | None:
    """Create the run directory, or find the step to resume from in it (the same command resumes)."""
    out.mkdir(parents=True, exist_ok=True)
    resume = checkpoint.latest(out / CHECKPOINTS / "client")
    if resume is not None:
        saved = (out / "config.yaml").read_text() if (out / "config.yaml").exists() else ""
        if saved != dump_config(cfg):
            raise ConfigError(f"{out} holds a checkpoint of another config; resume with the same config, or use another --out")
        return resume
    (out / "config.yaml").write_text(dump_config(cfg))
    return None


def train_remote(cfg: RunConfig, out: Path, client_index: int, channel_for: Callable[[int], Channel],
                 progress: Callable | None = None) -> dict[str, Any]:
    """One client of a deployed run: this process's data and segments, the server over ``channel_for``.

    Everything else is the in-process code path; with the same config the losses, adapters and byte
    counts equal the in-process run's. Evaluations use this client's held-out data.
    """
    if cfg.mode == "centralized":
        raise ConfigError("mode: centralized trains without a server; drop --server")
    if not 0 <= client_index < cfg.clients:
        raise ConfigError(f"--client-index {client_index} is outside this run's clients 0..{cfg.clients - 1}")
    started = time.perf_counter()
    resume = prepare_run_dir(cfg, out)
    set_seed(cfg.seed)
    source = resolve_model(cfg.model)
    task = client_tasks(cfg, source.tokenizer())[client_index]
    fleet = connect(cfg, source, [len(task.train)], [client_index], channel_for, resume=resume)
    try:
        return Session(cfg, fleet, [task], task, out, progress, started, resume).run()
    finally:
        for channel in fleet.channels:
            if channel is not None:
                channel.close()


class Session:
    """The training loop of one run: client steps in schedule order, averages, evaluations, outputs."""

    def __init__(self, cfg, fleet: Fleet, tasks: list[TaskData], pooled: TaskData, out: Path, progress, started: float,
                 resume: int | None = None):
        self.cfg, self.fleet, self.tasks, self.pooled, self.out, self.progress, self.started = cfg, fleet, tasks, pooled, out, progress, started
        self.n = len(tasks)  # clients in this process
        self.index = fleet.indices  # their indices in the run
        self.total = cfg.clients if cfg.mode != "centralized" else 1  # clients in the run
        self.schedule = "federated" if cfg.mode == "federated" else ("centralized" if cfg.mode == "centralized" else cfg.schedule)
        self.samplers = [iter(task.sampler(cfg.train.batch_size, cfg.seed)) for task in tasks]
        self.metrics: list[dict] = []
        self.evals: list[dict] = []
        self.train_bytes = [[0, 0] for _ in tasks]
        self.sync_bytes = [[0, 0] for _ in tasks]
        self.done = 0
        self.holder = 0  # the client holding the latest model (the sequential relay moves it)
        self.start = 0  # the last completed step (a resumed run continues after it)
        self.own_before: list[dict] = []
        if resume is not None:
            self._restore(resume)

    # -- one client step ----------------------------------------------------------------------------------
    def _step(self, job: tuple[int, int]) -> dict:
        i, step = job
        t = self.cfg.train
        task, client = self.tasks[i], self.fleet.clients[i]
        micro = [task.collate([task.train[k] for k in next(self.samplers[i])]) for _ in range(t.grad_accum)]
        up0, down0 = self.fleet.bytes(i)
        t0 = time.perf_counter()
        result = client.train_step(step, micro)
        step_s = time.perf_counter() - t0
        up1, down1 = self.fleet.bytes(i)
        self.train_bytes[i][0] += up1 - up0
        self.train_bytes[i][1] += down1 - down0
        return {"step": step, "client": self.index[i], "loss": result.loss, "lr": result.lr, "tokens": result.tokens,
                "bytes_up": up1 - up0, "bytes_down": down1 - down0, "step_s": round(step_s, 6)}

    def _round(self, jobs: list[tuple[int, int]], log) -> None:
        for row in parallel(self._step, jobs, self.fleet.abort):
            self.metrics.append(row)
            log.write(json.dumps(row) + "\n")
            self.done += 1
            if self.progress:
                self.progress(self.done, self.n * self.cfg.train.steps, row)
        log.flush()

    def _sync(self, i: int, call: Callable[[Client], None]) -> None:
        """An average or a relay: traffic counted apart from the steps' (and in the totals)."""
        up0, down0 = self.fleet.bytes(i)
        call(self.fleet.clients[i])
        up1, down1 = self.fleet.bytes(i)
        self.sync_bytes[i][0] += up1 - up0
        self.sync_bytes[i][1] += down1 - down0

    # -- evaluation ------------------------------------------------------------------------------------
    def _evaluate(self, client_index: int, task: TaskData, view=contextlib.nullcontext) -> dict:
        t = self.cfg.train
        i = client_index
        up0, down0 = self.fleet.bytes(i)
        with view():
            result = evaluate(self.fleet.clients[i], task, t.batch_size, t.eval_batches)
        up1, down1 = self.fleet.bytes(i)
        if self.fleet.channels[i] is not None:  # evaluation traffic is reported, kept out of the training counts
            result["bytes_up"], result["bytes_down"] = up1 - up0, down1 - down0
        return result

    def _global_eval(self, step: int) -> dict:
        """The global model on the held-out data of this process's clients (all of them in-process)."""
        personal = set(self.cfg.personal)
        if personal and step > 0:
            state = self.fleet.clients[0].global_state()
            view = lambda: global_view(self.fleet.clients[0], state, personal)  # noqa: E731
            result = self._evaluate(0, self.pooled, view)
        else:
            result = self._evaluate(self.holder, self.pooled)
        row = {"step": step, **result, "train_bytes": sum(u + d for u, d in self.train_bytes) + sum(u + d for u, d in self.sync_bytes)}
        self.evals.append(row)
        return row

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and step % every == 0 and step != self.cfg.train.steps

    # -- the schedules -----------------------------------------------------------------------------------
    def _train(self, log) -> None:
        steps, every = self.cfg.train.steps, self.cfg.aggregate_every
        if self.schedule == "sequential" and self.total > 1:
            spans = [range(s, min(s + every, steps + 1)) for s in range(1, steps + 1, every)]
            for r, span in enumerate(spans):
                if span[-1] <= self.start:  # done before a resume
                    continue
                for index in range(self.total):  # other processes' turns are theirs: the server orders them
                    if index not in self.index:
                        continue
                    i = self.index.index(index)
                    if r or index:
                        self._sync(i, lambda c: c.take_over(span[0]))
                    for step in span:
                        self._round([(i, step)], log)
                    self._sync(i, lambda c: c.hand_on(span[-1]))
                    self.holder = i
                if self._eval_due(span[-1]):
                    self._global_eval(span[-1])
                self._maybe_stop(span[-1])  # a relay checkpoints at the end of a round: every client is between turns
            for i in range(self.n):  # everyone ends with the final model
                self._sync(i, lambda c: c.take_over(0))
            return
        for step in range(self.start + 1, steps + 1):
            self._round([(i, step) for i in range(self.n)], log)
            if self.total > 1 and (step % every == 0 or step == steps):
                parallel(lambda i: self._sync(i, lambda c: c.aggregate(step)), list(range(self.n)), self.fleet.abort)
            if self._eval_due(step):
                self._global_eval(step)
            self._maybe_stop(step)

    def _maybe_stop(self, step: int) -> None:
        """Checkpoint when due (every ``checkpoint_every`` steps, at the end, on a stop request); stop if asked."""
        keep, steps = self.cfg.train.checkpoint_every, self.cfg.train.steps
        if (keep and step % keep == 0) or step == steps or STOP.is_set():
            self._checkpoint(step)
        if STOP.is_set() and step < steps:
            raise Interrupted(step)

    # -- checkpoints (stage-independent: everything needed to continue exactly) -----------------------------
    def _checkpoint(self, step: int) -> None:
        """The server saves its part first, then this process saves its clients: a killed client always finds
        the server holding its step (the server keeps the last two)."""
        if self.fleet.channels[0] is not None:
            if not self.fleet.clients[0].server_info.get("checkpoints"):
                return  # a server without --state could not resume its part: a client checkpoint alone is useless
            parallel(lambda c: c.checkpoint(step), self.fleet.clients, self.fleet.abort)
        groups, parties = {}, {}
        for index, client in zip(self.index, self.fleet.clients):
            parts, parties[str(index)] = client.party.checkpoint()
            groups.update({f"c{index}.{name}": t for name, t in parts.items()})
        groups["rng"] = rng_state()
        meta = {"step": step, "samplers": [s.state_dict() for s in self.samplers], "metrics": self.metrics,
                "evals": self.evals, "own_before": self.own_before, "train_bytes": self.train_bytes,
                "sync_bytes": self.sync_bytes, "done": self.done, "holder": self.holder,
                "parties": parties}
        checkpoint.save(self.out / CHECKPOINTS / "client", step, checkpoint.pack(groups), meta)

    def _restore(self, step: int) -> None:
        flat, meta = checkpoint.load(self.out / CHECKPOINTS / "client", step)
        groups = checkpoint.unpack(flat)
        for index, client in zip(self.index, self.fleet.clients):
            prefix = f"c{index}."
            client.party.restore({k.removeprefix(prefix): v for k, v in groups.items() if k.startswith(prefix)}, meta["parties"][str(index)])
        for sampler, state in zip(self.samplers, meta["samplers"], strict=True):
            sampler.load_state_dict(state)
        set_rng_state(groups["rng"])
        self.metrics, self.evals, self.own_before = meta["metrics"], meta["evals"], meta["own_before"]
        self.train_bytes, self.sync_bytes, self.done, self.holder = meta["train_bytes"], meta["sync_bytes"], meta["done"], meta["holder"]
        self.start = step

    def run(self) -> dict[str, Any]:
        if self.start == 0:
            before = self._global_eval(0)
            self.own_before = [self._evaluate(i, task) for i, task in enumerate(self.tasks)] if self.total > 1 else [before]
        before, own_before = self.evals[0], self.own_before
        with open(self.out / "metrics.jsonl", "w") as log:
            log.writelines(json.dumps(row) + "\n" for row in self.metrics)  # a resumed run keeps the steps it had
            self._train(log)
        after = self._global_eval(self.cfg.train.steps)
        own_after = [self._evaluate(i, task) for i, task in enumerate(self.tasks)] if self.total > 1 else [after]
        with open(self.out / "evals.jsonl", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in self.evals)
        save_adapters(self.out / ADAPTERS, self.fleet, self.cfg)
        plot_loss(self.metrics, self.evals, self.out / "loss.png", self._title())
        summary = self._summary(before, after, own_before, own_after)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _title(self) -> str:
        plan = self.fleet.clients[0].plan
        who = f" · {self.total} clients · {self.schedule}" if self.total > 1 else ""
        return f"{self.cfg.model} · {plan.shape} · cuts {self.cfg.cuts}{who}"

    # -- summary ---------------------------------------------------------------------------------------
    def _summary(self, before: dict, after: dict, own_before: list[dict], own_after: list[dict]) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        clients = self.fleet.clients
        first = [m for m in self.metrics if m["step"] == 1]
        last = [m for m in self.metrics if m["step"] == t.steps]
        step_times = sorted(m["step_s"] for m in self.metrics)
        server_info = clients[0].server_info
        summary = {
            "mode": cfg.mode,
            "schedule": self.schedule,
            "clients": self.total,
            "shape": clients[0].plan.shape,
            "model": cfg.model,
            "cuts": list(cfg.cuts),
            "steps": t.steps,
            "seed": cfg.seed,
            "task": self.pooled.kind,
            "train_examples": sum(len(task.train) for task in self.tasks),
            "eval_examples": len(self.pooled.eval),
            "train_loss_first": sum(m["loss"] for m in first) / len(first),
            "train_loss_last": sum(m["loss"] for m in last) / len(last),
            "eval_loss_before": before["loss"],
            "eval_loss_after": after["loss"],
            "eval_ppl_before": before["ppl"],
            "eval_ppl_after": after["ppl"],
            "bytes_up": sum(b[0] for b in self.train_bytes) + sum(b[0] for b in self.sync_bytes),
            "bytes_down": sum(b[1] for b in self.train_bytes) + sum(b[1] for b in self.sync_bytes),
            "sync_bytes_up": sum(b[0] for b in self.sync_bytes),
            "sync_bytes_down": sum(b[1] for b in self.sync_bytes),
            "eval_bytes_up": sum(e.get("bytes_up", 0) for e in self.evals),
            "eval_bytes_down": sum(e.get("bytes_down", 0) for e in self.evals),
            "wall_s": round(time.perf_counter() - self.started, 3),
            "step_s_mean": sum(step_times) / len(step_times),
            "step_s_median": step_times[len(step_times) // 2],
            "device": str(clients[0].party.device),
            "server_device": server_info.get("device"),
            "client_params": clients[0].party.weights.params,
            "client_bytes": clients[0].party.weights.bytes,
            "client_trainable": clients[0].party.trainable_params,
            "server_params": server_info.get("params", 0),
            "server_bytes": server_info.get("bytes", 0),
            "server_trainable": server_info.get("trainable", 0),
            "versions": {"splittune": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }
        if "accuracy" in before:
            summary["eval_accuracy_before"] = before["accuracy"]
            summary["eval_accuracy_after"] = after["accuracy"]
        summary["per_client"] = [self._client_entry(i, own_before[i], own_after[i]) for i in range(self.n)]
        return summary

    def _client_entry(self, i: int, before: dict, after: dict) -> dict[str, Any]:
        client, task = self.fleet.clients[i], self.tasks[i]
        rows = [m for m in self.metrics if m["client"] == self.index[i]]
        entry = {
            "client": self.index[i],
            "cuts": list(client.party.session.cuts),
            "lora_rank": client.party.session.lora_rank,
            "samples": len(task.train),
            "train_examples": len(task.train),
            "eval_examples": len(task.eval),
            "data": {k: v for k, v in task.stats.items() if k in ("source", "documents", "records", "labels")},
            "train_loss_last": rows[-1]["loss"],
            "eval_loss_before": before["loss"],
            "eval_loss_after": after["loss"],
            "bytes_up": self.train_bytes[i][0] + self.sync_bytes[i][0],
            "bytes_down": self.train_bytes[i][1] + self.sync_bytes[i][1],
            "sync_bytes_up": self.sync_bytes[i][0],
            "sync_bytes_down": self.sync_bytes[i][1],
            "client_params": client.party.weights.params,
            "client_trainable": client.party.trainable_params,
        }
        if "accuracy" in before:
            entry["eval_accuracy_before"], entry["eval_accuracy_after"] = before["accuracy"], after["accuracy"]
        return entry


def _save(root: Path, folder: Path, name: str, state: dict[str, torch.Tensor], role: str) -> dict:
    path = folder / f"{name}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata={"party": role, "format": "splittune-adapter"})
    return {"file": str(path.relative_to(root)), "tensors": len(state), "params": sum(v.numel() for v in state.values())}


def save_adapters(folder: Path, fleet: Fleet, cfg: RunConfig) -> None:
    """The global model's trainable tensors (each party's part, or the average), under the unsplit model's
    names, in safetensors; with several clients also each client's own (personalised) model."""
    folder.mkdir(parents=True, exist_ok=True)
    clients = fleet.clients
    first = clients[0]
    manifest = {"model": cfg.model, "cuts": list(cfg.cuts), "shape": first.plan.shape,
                "segments": cfg.segments.model_dump(), "lora": cfg.lora.model_dump(), "files": {}, "clients": {},
                "fan_in_fan_out": bool(first.party.fan_in_fan_out or first.server_info.get("fan_in_fan_out"))}
    several = cfg.clients > 1 and cfg.mode != "centralized"
    averaged = several and not (cfg.mode == "split" and cfg.schedule == "sequential")
    if averaged:
        parts = {"global": first.global_state()}
    else:
        parts = {"client": first.party.state(), "server": first.server_state()}
    for name, state in parts.items():
        if state:
            manifest["files"][name] = _save(folder, folder, name, state, name)
    if several:
        folds = {k: v for k, v in parts.get("global", {}).items() if k.startswith("fold::")}
        for i, client in zip(fleet.indices, clients):
            sub = folder / f"client{i}"
            sub.mkdir(exist_ok=True)
            own = client.party.state()
            keep = personal_names(own, client.plan, set(cfg.personal), client.party.spec)
            mine = {k: v for k, v in folds.items() if f"{k.removeprefix('fold::')}.lora_A.weight" not in keep}
            files = {}
            for name, state in (("client", own), ("server", client.server_state()), ("folds", mine)):
                if state:
                    files[name] = _save(folder, sub, name, state, f"client {i}")
            manifest["clients"][str(i)] = files
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
