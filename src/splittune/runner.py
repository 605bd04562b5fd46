"""One run, in-process: every stage of DESIGN.md's pipeline in order, and the run directory.

``mode: split`` builds the clients and a server joined by local channels; ``mode: centralized`` runs
the same client code with the whole model and no channel (the baseline shares everything else);
``mode: federated`` gives every client the whole model and uses the server only to average. Clients
run in threads, as they would run in processes: the server orders their requests (schedules/).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import platform
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from . import __version__, checkpoint
from .channels import Channel, LocalChannel
from .channels.emulated import EmulatedChannel, LinkModel
from .cut import CutLink, ServerLink, terms_from
from .privacy.budget import defense_summary
from .privacy.recording import SENT, TAP_DIR, Recording, SentLog
from .config import ConfigError, RunConfig, dump_config, load_config, warn
from .data import TaskData, build_client_tasks, merge_tasks
from .device import peak_memory, resolve_device, rng_state, set_rng_state
from .eval import evaluate
from .models.arch import check_seq_len, detect_arch
from .models.partition import PlanError
from .models.zoo import ModelSource, resolve_model
from .parties import Client, Party, Server, SessionSpec
from .parties.cache import MIRROR_COUNTS
from .parties.defenses import PARTY_DEFENSES, ClientDefenses
from .parties.dp_sgd import DPSGD
from .privacy.accounting import most_releases, noise_for_epsilon
from .schedules.policy import POLICIES, policy_for
from .report.plots import plot_loss
from .rundir import RunLock
from .threads import compute_threads
from .parties.group import personal_names

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
    """Everything a run trains with: its clients, the server they share, each client's end of the cut."""

    clients: list[Client]
    server: Server | None  # None when the server is another process
    links: list[CutLink | None]
    source: ModelSource
    indices: list[int]  # each local client's index in the run (all of them in-process)

    def abort(self, err: BaseException) -> None:
        """A client failed: the server stops waiting for it, so the other clients fail fast instead of timing out."""
        if self.server is not None:
            self.server.cancel(f"a client failed: {err}")

    def bytes(self, i: int) -> tuple[int, int]:
        link = self.links[i]
        return (link.bytes_up, link.bytes_down) if link else (0, 0)

    def close(self) -> None:
        for link in self.links:
            if link is not None:
                link.close()
        if self.server is not None:
            self.server.close()


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
            channel_for: Callable[[int], Channel] | None = None, resume: int | None = None, state_dir: Path | None = None,
            link_states: dict[int, dict] | None = None, recording: Recording | None = None,
            ledger: SentLog | None = None, run_id: str = "") -> Fleet:
    """Stage 0: plan the split, build the parties, and say hello (the server forms the group).

    In-process, every client is built here with a local channel to a server built here too; a client
    process passes its own ``indices`` and ``channel_for`` (a gRPC channel to the server process).
    ``recording`` taps the in-process server for its observers and keeps each client's truth; ``ledger`` notes
    every message the clients send (``sent.jsonl``).
    """
    config = source.config()
    spec = detect_arch(config)
    cfg = cfg.resolve(spec.n_blocks)  # cuts: auto → the cuts that fit this model
    check_seq_len(spec, cfg.train.seq_len, model=cfg.model)
    fingerprint = source.fingerprint()
    n = len(samples) if indices is None else (cfg.clients if cfg.mode != "centralized" else 1)
    indices = list(range(len(samples))) if indices is None else indices
    device = resolve_device(cfg.train.device)
    policy = policy_for(cfg.mode, cfg.schedule)
    server = None
    if channel_for is None and cfg.mode != "centralized":
        server = Server(source, spec, config, state_dir=state_dir, device=device, policies=POLICIES)
        server_link = ServerLink(server.handle)
        serve = recording.attach(server, server_link) if recording is not None else server_link.serve
        channel_for = lambda i: LocalChannel(serve)  # noqa: E731
    terms = terms_from(cfg.codec.model_dump(), cfg.padding_removal, wire_defenses(cfg))
    clients, links = [], []
    fleet = Fleet(clients, server, links, source, indices)  # filled as parties are built, so a failure closes them
    try:
        for i, count in zip(indices, samples, strict=True):
            session = SessionSpec.from_run(cfg, fingerprint, spec.model_type, i, count, clients=n, model=source.describe(),
                                           run_id=run_id)
            try:
                party = Party("client", source, spec, session, config, device=device, total_steps=policy.client_steps(cfg.train.steps, n),
                              recompute=cfg.train.gradient_checkpointing)
            except (PlanError, ValueError) as err:
                raise type(err)(f"client {i}: {err}" if n > 1 else str(err)) from None
            link = None
            if channel_for is not None and cfg.mode != "centralized":
                channel = channel_for(i)
                if cfg.link.active:
                    channel = EmulatedChannel(channel, LinkModel.of(cfg.link))
                link = CutLink(channel, uuid.uuid4().hex[:12], terms, secret=client_secret(cfg, i))
                link.sent_log = ledger
            links.append(link)
            client = Client(party, link, cfg.train.micro_batches, cfg.train.max_in_flight)
            own = [d.model_dump() for d in cfg.defense if d.name in PARTY_DEFENSES]
            if own:
                client.defenses = ClientDefenses(own, party, client_secret(cfg, i))
            if cfg.dp_sgd is not None:
                steps = policy.client_steps(cfg.train.steps, n)
                client.dp = DPSGD(party, dp_noise(cfg, count, steps), cfg.dp_sgd.max_grad_norm, client_secret(cfg, i))
            if recording is not None:
                client.recorder = recording.truth
            clients.append(client)
        states = link_states or {}
        parallel(lambda pair: pair[1].connect(resume, states.get(pair[0])), list(zip(indices, clients)), fleet.abort)
    except BaseException:  # a refused hello, a failed party: close what was opened, never leave it to the collector
        fleet.close()
        raise
    return fleet


def build(cfg: RunConfig) -> tuple[Client, Server | None, CutLink | None, ModelSource]:
    """A single-client run's parties and the client's end of the cut (what tests and ``verify`` drive step by step)."""
    fleet = connect(cfg, resolve_model(cfg.model), [1])
    return fleet.clients[0], fleet.server, fleet.links[0], fleet.source


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


def owns_run_dir(shared: Callable[[RunConfig], bool]):
    """A run function that holds ``out``'s lock (rundir.py) and computes with ``train.threads`` while it runs;
    ``shared(cfg)``: whether several parties share this process (the ``auto`` thread count depends on it)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg: RunConfig, out: Path, *args, **kwargs):
            with RunLock(out, "run"), compute_threads(cfg.train.threads, shared(cfg)):
                return fn(cfg, out, *args, **kwargs)
        return run
    return wrap


def computes_concurrently(cfg: RunConfig) -> bool:
    """Whether parties of an in-process run compute at the same time (and so must share the cores): several
    clients run their steps at once, and pipelined micro-batches overlap the client with the server. One
    client without pipelining takes turns with the server, and one pool of every core serves both."""
    return cfg.mode != "centralized" and (cfg.clients > 1 or cfg.train.micro_batches > 1)


def resolved(cfg: RunConfig, source: ModelSource) -> RunConfig:
    """The run's config for this model (``cuts: auto`` resolved): what config.yaml records and resume compares."""
    return cfg.resolve(detect_arch(source.config()).n_blocks)


@owns_run_dir(shared=lambda cfg: computes_concurrently(cfg))
def train(cfg: RunConfig, out: Path, progress: Callable | None = None, record_tap: tuple[str, ...] = (),
          tap_max_bytes: int = 1 << 30) -> dict[str, Any]:
    """Run ``cfg`` and write its run directory; returns the summary.

    ``progress(done, total, row)`` is called after every client step with its metrics row (the CLI draws a
    progress bar with it), and with ``row["phase"]`` set for what is not a step (see ``Session.event``).
    ``record_tap`` names the observers whose taps the run records in ``out/tap`` (each at most ``tap_max_bytes``).
    """
    started = time.perf_counter()
    set_seed(cfg.seed)
    source = resolve_model(cfg.model)
    cfg = with_defense_seed(resolved(cfg, source), out)
    resume = prepare_run_dir(cfg, out)
    recording = _recording(cfg, out, record_tap, tap_max_bytes, resume)
    tasks = client_tasks(cfg, source.tokenizer())
    pooled = merge_tasks(tasks) if len(tasks) > 1 else tasks[0]
    ledger = SentLog(out / SENT, append=resume is not None) if cfg.mode != "centralized" else None
    try:
        fleet = connect(cfg, source, [len(task.train) for task in tasks], resume=resume, state_dir=out / CHECKPOINTS / "server",
                        run_id=run_identity(out),
                        link_states=saved_link_states(out, resume), recording=recording, ledger=ledger)
        # the fleet stays usable after the run (tests and tools read its parties); nobody holding it stops its threads
        return Session(cfg, fleet, tasks, pooled, out, progress, started, resume).run()
    finally:
        for record in (recording, ledger):
            if record is not None:
                record.close()


def wire_defenses(cfg: RunConfig) -> tuple[dict, ...]:
    """The defenses that run in the chain's defense slot (on what crosses); the others act inside the client."""
    return tuple(d.model_dump() for d in cfg.defense if d.name not in PARTY_DEFENSES)


def dp_noise(cfg: RunConfig, examples: int, steps: int) -> float:
    """DP-SGD's noise multiplier: as given, or the smallest that keeps both of the run's ε (``privacy/budget.py``: at
    this client's sampling rate over ``steps``, and unamplified over the steps an example is in) within
    ``target_epsilon`` (opacus' RDP search)."""
    dp = cfg.dp_sgd
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    releases = most_releases(examples, cfg.train.batch_size * cfg.train.grad_accum, steps)
    return max(noise_for_epsilon(dp.target_epsilon, steps, dp.delta, sample_rate=dp_sample_rate(cfg, examples)),
               noise_for_epsilon(dp.target_epsilon, releases, dp.delta))  # both bounds of privacy/budget.py within it


def dp_sample_rate(cfg: RunConfig, examples: int) -> float:
    return min(1.0, cfg.train.batch_size * cfg.train.grad_accum / max(examples, 1))


def with_defense_seed(cfg: RunConfig, out: Path) -> RunConfig:
    """A run with defenses draws their noise from ``defense_seed``; unset, it is the seed this run directory's config
    recorded (a resume), else a fresh random one, which config.yaml then records."""
    if not (cfg.defense or cfg.dp_sgd) or cfg.defense_seed is not None:
        return cfg
    saved = load_config(out / "config.yaml").defense_seed if (out / "config.yaml").exists() else None
    return cfg.model_copy(update={"defense_seed": saved if saved is not None else secrets.randbits(62)})


def client_secret(cfg: RunConfig, client: int) -> int | None:
    """Client ``client``'s private seed for its defenses' noise, from ``defense_seed`` (never sent to the server)."""
    if cfg.defense_seed is None:
        return None
    digest = hashlib.blake2b(f"splittune-defense:{cfg.defense_seed}:{client}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _recording(cfg: RunConfig, out: Path, observers: tuple[str, ...], max_bytes: int, resume: int | None) -> Recording | None:
    """The taps a run records, or a ConfigError saying why this run cannot record them."""
    if not observers:
        return None
    if cfg.mode == "centralized":
        raise ConfigError("--record-tap records what crosses a cut, and mode: centralized has no cut")
    if resume is not None:
        raise ConfigError(f"--record-tap records a whole run, and {out} resumes one from step {resume}; record into a new --out")
    if (out / TAP_DIR).exists():
        raise ConfigError(f"{out / TAP_DIR} already holds a tap; record into a new --out")
    return Recording(out / TAP_DIR, observers, max_bytes)


def saved_link_states(out: Path, step: int | None) -> dict[int, dict]:
    """Each client's cut-link state (both ends' chains: error-feedback residuals) in the checkpoint at ``step``;
    a resumed session's hello hands the server its end's back."""
    if step is None:
        return {}
    flat, _ = checkpoint.load(out / CHECKPOINTS / "client", step)
    states: dict[int, dict] = {}
    for key, t in flat.items():
        group, _, name = key.partition("/")
        if group.startswith("c") and group.endswith(".link"):
            states.setdefault(int(group[1:-5]), {})[name] = t
    return states


RUN_ID = "run-id"


def run_identity(out: Path) -> str:
    """This run's id: random, made with its run directory and kept there, so a resume is the same run to the server
    and two runs with the same config never share what the server keeps of them."""
    path = out / RUN_ID
    if path.exists():
        return path.read_text().strip()
    made = secrets.token_hex(8)
    path.write_text(made + "\n")
    return made


def prepare_run_dir(cfg: RunConfig, out: Path) -> int | None:
    """Create the run directory, or find the step to resume from in it (the same command resumes).

    ``cfg`` is the resolved config (``resolved``); the caller holds the directory's lock (``owns_run_dir``).
    """
    out.mkdir(parents=True, exist_ok=True)
    resume = checkpoint.latest(out / CHECKPOINTS / "client", warn)
    if resume is not None:
        saved = (out / "config.yaml").read_text() if (out / "config.yaml").exists() else ""
        if saved != dump_config(cfg):
            raise ConfigError(f"{out} holds a checkpoint of another config; resume with the same config, or use another --out")
        return resume
    (out / "config.yaml").write_text(dump_config(cfg))
    return None


@owns_run_dir(shared=lambda cfg: False)  # one client process; its server is elsewhere
def train_remote(cfg: RunConfig, out: Path, client_index: int, channel_for: Callable[[int], Channel],
                 progress: Callable | None = None) -> dict[str, Any]:
    """One client of a deployed run: this process's data and segments, the server over ``channel_for``.

    Everything else is the in-process code path; with the same config the losses, adapters and byte
    counts equal the in-process run's. Evaluations use this client's held-out data. When a restarted peer
    rejoins the run, this client goes back to the step it rejoined at and goes on from there.
    """
    from .channels.base import RemoteError

    if cfg.mode == "centralized":
        raise ConfigError("mode: centralized trains without a server; drop --server")
    if not 0 <= client_index < cfg.clients:
        raise ConfigError(f"--client-index {client_index} is outside this run's clients 0..{cfg.clients - 1}")
    started = time.perf_counter()
    set_seed(cfg.seed)
    source = resolve_model(cfg.model)
    cfg = with_defense_seed(resolved(cfg, source), out)
    resume = prepare_run_dir(cfg, out)
    task = client_tasks(cfg, source.tokenizer())[client_index]
    fresh = rng_state()  # a run rolled back to its start begins as this one did
    while True:
        set_rng_state(fresh)  # (a resumed run restores its checkpoint's)
        try:
            return _train_remote(cfg, out, source, task, client_index, channel_for, progress, started, resume)
        except RemoteError as err:
            if err.rejoin is None:
                raise
            resume = rejoin_from(out, err.rejoin, str(err))


def _train_remote(cfg: RunConfig, out: Path, source: ModelSource, task: TaskData, client_index: int,
                  channel_for: Callable[[int], Channel], progress: Callable | None, started: float, resume: int | None):
    from .channels.base import ConnectionLost, RemoteError

    ledger = SentLog(out / SENT, append=resume is not None)
    session = fleet = None
    try:
        fleet = connect(cfg, source, [len(task.train)], [client_index], channel_for, resume=resume, run_id=run_identity(out),
                        link_states=saved_link_states(out, resume), ledger=ledger)
        session = Session(cfg, fleet, [task], task, out, progress, started, resume)
        return session.run()
    except RemoteError as err:
        if err.code not in LOST or isinstance(err, ConnectionLost):
            raise
        if fleet is None:
            raise
        raise _connection_lost(err, cfg, out, fleet, session) from None
    finally:
        if fleet is not None:
            fleet.close()
        ledger.close()


def rejoin_from(out: Path, step: int, why: str) -> int | None:
    """A restarted peer rejoined the run at ``step``: this client goes back to its own checkpoint of that step (the
    later ones belong to a timeline the run left) and says so. Returns the step to resume from (None: the start)."""
    root = out / CHECKPOINTS / "client"
    if step and checkpoint.damage(root / f"step-{step}") is not None:
        raise ConfigError(f"a peer rejoined the run from step {step}, but {out} holds no intact checkpoint of that step "
                          f"({checkpoint.damage(root / f'step-{step}')}); restart every client of the run")
    checkpoint.discard_after(root, step)
    warn(f"{why}: resuming from " + (f"the checkpoint at step {step}" if step else "the start"))
    return step or None


# the statuses of a connection that broke (the server process died, the network went away), not of a refusal
LOST = ("UNAVAILABLE", "CANCELLED", "DATA_LOSS", "UNKNOWN")


def _connection_lost(err, cfg: RunConfig, out: Path, fleet: Fleet, session: "Session | None"):
    """What a client whose server vanished says (a ``ConnectionLost``): where it stopped, and where the same
    command resumes."""
    from .channels.base import ConnectionLost

    done = max((row["step"] for row in session.metrics), default=session.start) if session is not None else 0
    at = f"after step {done} (in the final evaluation)" if done >= cfg.train.steps else f"at step {done + 1}"
    saved = checkpoint.latest(out / CHECKPOINTS / "client")
    if saved is not None:
        then = f"rerunning the same command (once the server is back) resumes from the checkpoint at step {saved}"
    elif not fleet.clients[0].server_info.get("checkpoints"):
        then = ("no checkpoint yet: the server needs --state DIR (and train.checkpoint_every) to resume; "
                "rerunning the same command starts from the start")
    elif not cfg.train.checkpoint_every:
        then = "no checkpoint yet: set train.checkpoint_every to resume mid-run; rerunning the same command starts from the start"
    else:
        then = f"no checkpoint yet (the first is at step {cfg.train.checkpoint_every}); rerunning the same command starts from the start"
    return ConnectionLost(f"the connection to the server was lost {at} ({err}); {then}", err.code)


def train_batch(task: TaskData, indices: list[int]) -> dict[str, torch.Tensor]:
    """A training batch of ``task``'s examples ``indices``, with their ``sample_id``: a row's identity for the
    activation cache (``parties/cache.py``)."""
    batch = task.collate([task.train[k] for k in indices])
    batch["sample_id"] = torch.tensor(indices, dtype=torch.int64)
    return batch


def time_breakdown(step_s: float, stats: dict) -> dict[str, Any]:
    """Where a client step's time went (docs/efficiency.md): this client's compute and codecs, the time it
    waited for replies; of the round trips, the server's own time and the rest (the wire, queues and the
    server's encoding of its reply). With pipelining, waits overlap the server's work, so the parts of one
    side need not add up to the other's."""
    row = {"compute_s": round(max(step_s - stats["wait_s"] - stats["codec_s"], 0.0), 6), "codec_s": round(stats["codec_s"], 6),
           "wait_s": round(stats["wait_s"], 6), "server_s": round(stats["server_s"], 6), "wire_s": round(stats["wire_s"], 6)}
    for direction, error in stats["error"].items():
        if error is not None:
            row[f"codec_error_{direction}"] = error
    return row


def step_breakdown(rows: list[dict]) -> dict[str, Any]:
    """The median step's time breakdown and each direction's mean codec error, for the summary."""
    out: dict[str, Any] = {}
    parts = [k for k in BREAKDOWN if rows and all(k in r for r in rows)]
    if parts:
        out["time_median_s"] = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in parts}
    for direction in ("up", "down"):
        errors = [r[f"codec_error_{direction}"] for r in rows if f"codec_error_{direction}" in r]
        if errors:
            out[f"codec_error_{direction}"] = sum(errors) / len(errors)
    return out


BREAKDOWN = ("compute_s", "codec_s", "wait_s", "server_s", "wire_s")


class Session:
    """The training loop of one run: client steps in schedule order, averages, evaluations, outputs."""

    def __init__(self, cfg, fleet: Fleet, tasks: list[TaskData], pooled: TaskData, out: Path, progress, started: float,
                 resume: int | None = None):
        self.cfg, self.fleet, self.tasks, self.pooled, self.out, self.progress, self.started = cfg, fleet, tasks, pooled, out, progress, started
        self.n = len(tasks)  # clients in this process
        self.index = fleet.indices  # their indices in the run
        self.total = cfg.clients if cfg.mode != "centralized" else 1  # clients in the run
        self.policy = policy_for(cfg.mode, cfg.schedule)
        self.schedule = self.policy.name
        self.samplers = [iter(task.sampler(cfg.train.batch_size, cfg.seed)) for task in tasks]
        self.metrics: list[dict] = []
        self.evals: list[dict] = []
        self.train_bytes = [[0, 0] for _ in tasks]
        self.sync_bytes = [[0, 0] for _ in tasks]
        self.done = 0
        self.holder = 0  # the client holding the latest model (the sequential relay moves it)
        self.start = 0  # the last completed step (a resumed run continues after it)
        self.own_before: list[dict] = []
        self._check_settings()
        if resume is not None:
            self._restore(resume)

    def _check_settings(self) -> None:
        """Settings that run but hardly as meant: a warning each (the CLI prints a ``warning:`` line)."""
        t = self.cfg.train
        smallest = min(len(task.train) for task in self.tasks)
        if t.batch_size > smallest:
            whose = " of the smallest client" if self.n > 1 else ""
            warn(f"train.batch_size={t.batch_size} is larger than the training set ({smallest} examples{whose}): "
                 "every batch repeats examples; lower train.batch_size or use more data")
        if t.warmup_steps >= t.steps:
            warn(f"train.warmup_steps={t.warmup_steps} >= train.steps={t.steps}: the learning rate is still warming up "
                 "when training ends (the first step has rate 0); lower train.warmup_steps")
        off = self.fleet.clients[0].cache_off
        asked = self.cfg.cache.max_bytes not in (0, type(self.cfg.cache).model_fields["max_bytes"].default)  # not merely a dumped default
        if asked and off and self.fleet.clients[0].split:
            warn(f"cache.max_bytes is set, but the activation cache is off: {off}")

    def event(self, phase: str, done: int = 0, total: int = 0, **info) -> None:
        """Tell ``progress`` what happens besides steps: ``start`` (the plan: cuts, shape, threads, ``resume``: the
        step a resumed run continues after), ``eval`` (batch ``done`` of ``total`` of the evaluation ``label``) and
        ``evaluated`` (its ``loss`` and ``ppl``)."""
        if self.progress:
            self.progress(done, total, {"phase": phase, **info})

    # -- one client step ----------------------------------------------------------------------------------
    def _step(self, job: tuple[int, int]) -> dict:
        i, step = job
        t = self.cfg.train
        task, client = self.tasks[i], self.fleet.clients[i]
        micro = [train_batch(task, next(self.samplers[i])) for _ in range(t.grad_accum)]
        up0, down0 = self.fleet.bytes(i)
        link = self.fleet.links[i]
        if link is not None:
            link.stats.reset()
        client.bottom_s, client.penalty_sum, cached = 0.0, 0.0, client.cache_counts()
        t0 = time.perf_counter()
        result = client.train_step(step, micro)
        step_s = time.perf_counter() - t0
        up1, down1 = self.fleet.bytes(i)
        self.train_bytes[i][0] += up1 - up0
        self.train_bytes[i][1] += down1 - down0
        row = {"step": step, "client": self.index[i], "loss": result.loss, "lr": result.lr, "tokens": result.tokens,
               "bytes_up": up1 - up0, "bytes_down": down1 - down0, "step_s": round(step_s, 6)}
        if link is not None:
            row.update(time_breakdown(step_s, link.stats.take()))
            row["bottom_s"] = round(client.bottom_s, 6)
        nopeek = next((d.alpha for d in self.cfg.defense if d.name == "nopeek" and d.alpha > 0), None)
        if nopeek is not None:  # the step's mean distance correlation between embeddings and activations
            row["nopeek_dcor"] = round(client.penalty_sum / nopeek, 6)
        if cached:
            now = client.cache_counts()
            row.update(cache_hits=now["hits"] - cached["hits"], cache_misses=now["misses"] - cached["misses"])
        return row

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
    def _evaluate(self, client_index: int, task: TaskData, view=contextlib.nullcontext, label: str = "evaluation") -> dict:
        t = self.cfg.train
        i = client_index
        up0, down0 = self.fleet.bytes(i)
        on_batch = (lambda done, total: self.event("eval", done, total, label=label)) if self.progress else None
        with view():
            result = evaluate(self.fleet.clients[i], task, t.batch_size, t.eval_batches, on_batch=on_batch)
        up1, down1 = self.fleet.bytes(i)
        if self.fleet.links[i] is not None:  # evaluation traffic is reported, kept out of the training counts
            result["bytes_up"], result["bytes_down"] = up1 - up0, down1 - down0
        self.event("evaluated", label=label, loss=result["loss"], ppl=result["ppl"])
        return result

    def _label(self, step: int, client: int | None = None) -> str:
        when = "before training" if step == 0 else "after training" if step == self.cfg.train.steps else f"at step {step}"
        return when if client is None else f"client {client} {when} (own model, own data)"

    def _global_eval(self, step: int) -> dict:
        """The global model on the held-out data of this process's clients (all of them in-process)."""
        personal = set(self.cfg.personal)
        if personal and step > 0:
            state = self.fleet.clients[0].global_state()
            view = lambda: global_view(self.fleet.clients[0], state, personal)  # noqa: E731
            result = self._evaluate(0, self.pooled, view, self._label(step))
        else:
            result = self._evaluate(self.holder, self.pooled, label=self._label(step))
        row = {"step": step, **result, "train_bytes": sum(u + d for u, d in self.train_bytes) + sum(u + d for u, d in self.sync_bytes)}
        self.evals.append(row)
        return row

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and step % every == 0 and step != self.cfg.train.steps

    # -- the schedules -----------------------------------------------------------------------------------
    def _train(self, log) -> None:
        """The policy's rounds: every client of this process takes its turns; the server orders them."""
        for rnd in self.policy.rounds(self.total, self.cfg.train.steps, self.cfg.aggregate_every, self.start):
            mine = [(self.index.index(c), steps) for c, steps in rnd.turns if c in self.index]
            if rnd.concurrent:
                last = rnd.turns[0][1][-1]
                self._round([(i, last) for i, _ in mine], log)
                if rnd.sync == "aggregate":
                    parallel(lambda i: self._sync(i, lambda c: c.aggregate(last)), [i for i, _ in mine], self.fleet.abort)
            else:  # a relay: one client after another, each handing its model on
                for i, span in mine:
                    last = span[-1]
                    if span[0] > 1 or self.index[i]:
                        self._sync(i, lambda c: c.take_over(span[0]))
                    for step in span:
                        self._round([(i, step)], log)
                    self._sync(i, lambda c: c.hand_on(last))
                    self.holder = i
                last = rnd.turns[0][1][-1]
            if self._eval_due(last):
                self._global_eval(last)
            self._maybe_stop(last)  # a relay checkpoints at the end of a round: every client is between turns
        if self.policy.relays and self.total > 1:
            for i in range(self.n):  # everyone ends with the final model
                self._sync(i, lambda c: c.take_over(0))

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
        if self.fleet.links[0] is not None:
            if not self.fleet.clients[0].server_info.get("checkpoints"):
                return  # a server without --state could not resume its part: a client checkpoint alone is useless
            parallel(lambda c: c.checkpoint(step), self.fleet.clients, self.fleet.abort)
        groups, parties = {}, {}
        for index, client in zip(self.index, self.fleet.clients):
            parts, parties[str(index)] = client.party.checkpoint()
            groups.update({f"c{index}.{name}": t for name, t in parts.items()})
            if client.link is not None:
                groups[f"c{index}.link"] = client.link.state()
            if client.defenses is not None:
                groups[f"c{index}.defense"] = client.defenses.state_dict()
            if client.dp is not None:
                groups[f"c{index}.dp"] = client.dp.state_dict()
        groups["rng"] = rng_state()
        meta = {"step": step, "samplers": [s.state_dict() for s in self.samplers], "metrics": self.metrics,
                "evals": self.evals, "own_before": self.own_before, "train_bytes": self.train_bytes,
                "sync_bytes": self.sync_bytes, "done": self.done, "holder": self.holder,
                "parties": parties,
                "caches": {str(index): c.cache.state() for index, c in zip(self.index, self.fleet.clients) if c.cache is not None}}
        checkpoint.save(self.out / CHECKPOINTS / "client", step, checkpoint.pack(groups), meta)

    def _restore(self, step: int) -> None:
        flat, meta = checkpoint.load(self.out / CHECKPOINTS / "client", step)
        groups = checkpoint.unpack(flat)
        for index, client in zip(self.index, self.fleet.clients):
            prefix = f"c{index}."
            client.party.restore({k.removeprefix(prefix): v for k, v in groups.items() if k.startswith(prefix)}, meta["parties"][str(index)])
            if client.defenses is not None:
                client.defenses.load_state_dict(groups.get(f"{prefix}defense", {}))
            if client.dp is not None:
                client.dp.load_state_dict(groups.get(f"{prefix}dp", {}))
            if client.cache is not None and str(index) in meta.get("caches", {}):
                client.cache.load_state(meta["caches"][str(index)])
        for sampler, state in zip(self.samplers, meta["samplers"], strict=True):
            sampler.load_state_dict(state)
        set_rng_state(groups["rng"])
        self.metrics, self.evals, self.own_before = meta["metrics"], meta["evals"], meta["own_before"]
        self.train_bytes, self.sync_bytes, self.done, self.holder = meta["train_bytes"], meta["sync_bytes"], meta["done"], meta["holder"]
        self.start = step

    def run(self) -> dict[str, Any]:
        self.event("start", self.done, self.n * self.cfg.train.steps, resume=self.start or None, cuts=self.cfg.cuts,
                   shape=self.fleet.clients[0].plan.shape, threads=torch.get_num_threads())
        if self.start == 0:
            before = self._global_eval(0)
            self.own_before = ([self._evaluate(i, task, label=self._label(0, self.index[i])) for i, task in enumerate(self.tasks)]
                               if self.total > 1 else [before])
        before, own_before = self.evals[0], self.own_before
        with open(self.out / "metrics.jsonl", "w") as log:
            log.writelines(json.dumps(row) + "\n" for row in self.metrics)  # a resumed run keeps the steps it had
            self._train(log)
        after = self._global_eval(self.cfg.train.steps)
        own_after = ([self._evaluate(i, task, label=self._label(self.cfg.train.steps, self.index[i])) for i, task in enumerate(self.tasks)]
                     if self.total > 1 else [after])
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
        cuts = f"cuts {self.cfg.cuts}" if self.cfg.cuts is not None else "no cuts"
        return f"{self.cfg.model} · {plan.shape} · {cuts}{who}"

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
            "cuts": list(cfg.cuts) if cfg.cuts is not None else None,
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
            "threads": torch.get_num_threads(),
            "peak_memory": peak_memory(clients[0].party.device),  # this process's (both parties' in-process)
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
        summary.update(step_breakdown(self.metrics))
        dp = None
        if cfg.dp_sgd is not None:
            sizes = [len(task.train) for task in self.tasks]
            dp = {**cfg.dp_sgd.model_dump(), "noise_multiplier": clients[0].dp.sigma,
                  "sample_rate": max(dp_sample_rate(cfg, n) for n in sizes)}
        summary.update(defense_summary([d.model_dump() for d in cfg.defense], t.seq_len, t.batch_size * t.grad_accum,
                                       self.metrics, [len(task.train) for task in self.tasks], self.index,
                                       len(self.evals) + (2 * self.n if self.total > 1 else 0), dp))
        if clients[0].split:
            summary["cache"] = self._cache_summary()
        summary["per_client"] = [self._client_entry(i, own_before[i], own_after[i]) for i in range(self.n)]
        return summary

    def _cache_summary(self) -> dict[str, Any]:
        """The activation cache over this process's clients: whether it ran (or why not) and what it saved."""
        first = self.fleet.clients[0]
        counts = dict.fromkeys(MIRROR_COUNTS, 0)
        for client in self.fleet.clients:
            for key, value in client.cache_counts().items():
                counts[key] += value
        return {"on": first.cache is not None, "off_reason": first.cache_off,
                "max_bytes": first.cache.max_bytes if first.cache is not None else 0, **counts,
                "bottom_s": round(sum(r.get("bottom_s", 0.0) for r in self.metrics), 6)}

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
    manifest = {"model": cfg.model, "cuts": list(cfg.cuts) if cfg.cuts is not None else None, "shape": first.plan.shape,
                "segments": cfg.segments.model_dump(), "lora": cfg.lora.model_dump(), "files": {}, "clients": {},
                "fan_in_fan_out": bool(first.party.fan_in_fan_out or first.server_info.get("fan_in_fan_out"))}
    several = cfg.clients > 1 and cfg.mode != "centralized"
    averaged = several and policy_for(cfg.mode, cfg.schedule).averages(cfg.clients)
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
