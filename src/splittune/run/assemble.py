"""Stage 0 in one place: the parties of a run, the cut links between them and the channels under those links.

In-process, every client is built here with a local channel to a server built here too; a client process
builds its own client with a gRPC channel to the server process. The defenses' private seeds and DP-SGD's noise
are derived here, from the run's config, so every way of running a config builds the same parties.
"""

from __future__ import annotations

import hashlib
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..channels import Channel
from ..channels.emulated import EmulatedChannel, LinkModel
from ..config import RunConfig
from ..cut import CutLink, terms_from
from ..data import TaskData, build_client_tasks, merge_tasks
from ..device import resolve_device
from ..models.arch import check_seq_len, detect_arch
from ..models.sharing import FrozenBank
from ..models.partition import PlanError
from ..models.zoo import ModelSource, resolve_model
from ..parties import Client, Party, Server, SessionSpec
from ..defenses import ClientDefenses, Placement, chain_entries
from ..taps.recording import Recording, SentLog
from ..schedules.policy import policy_for
from ..engines.local import in_process, server_for


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


@dataclass
class Fleet:
    """Everything a run trains with: its clients, the server they share, each client's end of the cut."""

    clients: list[Client]
    server: Server | None  # None when the server is another process; a ``RayServer`` (its actor's handle) on Ray
    links: list[CutLink | None]
    source: ModelSource
    indices: list[int]  # each local client's index in the run (all of them in-process)

    def abort(self, err: BaseException) -> None:
        """A client failed: the server stops waiting for it, so the other clients fail fast instead of timing out."""
        if self.server is not None:
            self.server.cancel(f"a client failed: {err}")

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
    if len(items) <= 1:  # (none: a round that sampled none of this process's clients)
        return [fn(item) for item in items]
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


def ray_server(cfg: RunConfig, state_dir: Path | None):
    """The server's trunk in a Ray actor (``engine: ray``), on a cluster joined or started here."""
    from ..engines.ray import RayServer, start

    start(cfg.ray.address)
    return RayServer(cfg.model, state_dir, cfg.train.device, cfg.ray.server_resources.model_dump(), cfg.ray.trunk_spans)


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
    roster = policy.roster(n, cfg.round_size if cfg.samples_clients else None, cfg.seed)
    server = None
    if channel_for is None and cfg.mode != "centralized" and cfg.engine == "ray":
        server = ray_server(cfg, state_dir)
        channel_for = lambda i: server.channel()  # noqa: E731
    elif channel_for is None and cfg.mode != "centralized":
        server = server_for(source, spec, config, state_dir=state_dir, device=device)
        local = in_process(server, recording.attach if recording is not None else None)
        channel_for = lambda i: local()  # noqa: E731
    terms = terms_from(cfg.codec.model_dump(), cfg.padding_removal, chain_entries(cfg))
    clients, links = [], []
    fleet = Fleet(clients, server, links, source, indices)  # filled as parties are built, so a failure closes them
    bank = FrozenBank() if len(indices) > 1 else None  # this process's clients hold one copy of the frozen weights
    try:
        for i, count in zip(indices, samples, strict=True):
            session = SessionSpec.from_run(cfg, fingerprint, spec.model_type, i, count, clients=n, model=source.describe(),
                                           run_id=run_id)
            try:
                party = Party("client", source, spec, session, config, device=device, total_steps=policy.client_steps(cfg.train.steps, roster.size),
                              recompute=cfg.train.gradient_checkpointing)
            except (PlanError, ValueError) as err:
                raise type(err)(f"client {i}: {err}" if n > 1 else str(err)) from None
            if bank is not None:
                bank.share(party.model, fingerprint)
            link = None
            if channel_for is not None and cfg.mode != "centralized":
                channel = channel_for(i)
                if cfg.link.active:
                    channel = EmulatedChannel(channel, LinkModel.of(cfg.link))
                link = CutLink(channel, uuid.uuid4().hex[:12], terms, secret=client_secret(cfg, i))
                link.sent_log = ledger
            links.append(link)
            taken = sum(1 for t in range(1, cfg.train.steps + 1) if i in roster.at(t, cfg.aggregate_every))  # steps it trains
            at = Placement(party, client_secret(cfg, i), count, taken if roster.samples else policy.client_steps(cfg.train.steps, n),
                           cfg.train.batch_size * cfg.train.grad_accum)
            client = Client(party, link, cfg.train.micro_batches, cfg.train.max_in_flight, ClientDefenses.build(cfg, at))
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


def client_secret(cfg: RunConfig, client: int) -> int | None:
    """Client ``client``'s private seed for its defenses' noise, from ``defense_seed`` (never sent to the server)."""
    if cfg.defense_seed is None:
        return None
    digest = hashlib.blake2b(f"splittune-defense:{cfg.defense_seed}:{client}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
