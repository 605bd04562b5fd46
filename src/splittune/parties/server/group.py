"""The clients one server trains with: who they are, which blocks the server runs for each, which
server-side adapter each trains, the order of their turns, and stage 7 (their adapters averaged).

- ``sequential`` and ``sfl-v2``: one shared server-side adapter, updated by one client's step at a time;
- ``sfl-v1``: one server-side adapter per client on one shared frozen base (memory grows by an adapter
  per client, never by a copy of the trunk), averaged like the clients' own adapters;
- ``federated``: the server only averages; every client trains the whole model.

A block a client does not hold (its cut is lower than another's) is run by the server *on its
behalf*: in the average, the client contributes that server-side copy, so every block is averaged
over every client, each client with the copy that was trained on its data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ... import checkpoint
from ...averaging import Average, Contribution, average
from ...device import to_device
from ...models.partition import DTYPES
from ...models.arch import ArchSpec, block_of
from ...models.partition import SplitPlan
from ...models.sharing import FrozenBank
from ...models.zoo import ModelSource
from ...wire.names import FOLD, tag
from ..cache import ActivationCache
from ..party import Party, SessionSpec
from ..protocol import ProtocolError
from .meet import Rendezvous, Turnstile
from .spans import SpannedParty, bounds
from ..secure import SecureRounds

log = logging.getLogger("splittune.serve")


@dataclass
class Member:
    index: int
    session: str
    spec: SessionSpec
    start: int = 0  # the server blocks [start, end) run for this client
    end: int = 0
    head: bool = False  # two-part split: the server ends the model and computes this client's loss
    adapter: str = "default"
    cache: ActivationCache | None = None  # the activations this client sent, for later epochs (parties/cache.py)
    last_step: int = 0  # the last optimizer step this client took (its resume point at hello): steps only go forward


def personal_names(names, plan: SplitPlan, personal: set[str], arch: ArchSpec) -> set[str]:
    """Which of a client's tensors belong to the segments it keeps for itself (``personal``)."""
    keep = set()
    pre = tuple(m + "." for m in arch.pre)
    for seg in plan.party_segments("client"):
        if seg.name not in personal:
            continue
        for name in names:
            block = block_of(name, arch.blocks_path)
            if block is not None:
                inside = seg.start <= block < seg.end
            else:  # embeddings belong to the bottom, the final norm and head to the top
                inside = seg.embeds if name.startswith(pre) else seg.head
            if inside:
                keep.add(name)
    return keep


class Group:
    """``policies`` maps schedule names to policy objects (the run or ``serve`` hands them down)."""

    def __init__(self, first: SessionSpec, wait_s: float, policies: Mapping):
        if first.schedule not in policies:
            raise ValueError(f"unknown schedule {first.schedule!r}; schedules: {', '.join(policies)}")
        self.policy = policies[first.schedule]
        self.terms = first.shared_terms()
        self.n = first.clients
        self.schedule = first.schedule
        self.steps = first.steps
        self.every = first.aggregate_every
        self.personal = set(first.personal)
        self.members: dict[int, Member] = {}
        self.formed = False  # every client said hello (a client saying it again rejoins a run under way)
        self.dropped: set[int] = set()
        self.party: Party | None = None
        self.meet = Rendezvous(wait_s)
        self.secure = SecureRounds(first.clients) if first.secure_aggregation else None
        self.roster = self.policy.roster(self.n, first.per_round or None, first.seed)  # which clients each round trains
        order = self.policy.turn_order(self.roster, self.steps, self.every)
        self.turns = Turnstile(order, wait_s) if order else None
        self.relay: tuple[dict[str, torch.Tensor], dict] | None = None
        self.folded: dict[str, torch.Tensor] = {}  # module -> cumulative update moved into the base weights
        self.global_state: dict[str, torch.Tensor] = {}  # the last average, personal segments included
        self.averaged = 0  # the step of the last average
        self.blocks_path = ""
        self.arch: ArchSpec | None = None

    @property
    def active(self) -> set[int]:
        """The clients a checkpoint waits for: every member but those given up."""
        return set(self.members) - self.dropped

    def check_sampled(self, client: int, kind: str, step: int) -> None:
        """Refuse a message of a round that did not sample ``client`` (clients_per_round)."""
        if self.roster.samples and client not in self.roster.at(step, self.every):
            raise ProtocolError(f"client {client} sent a {kind} message for step {step}, but its round sampled clients "
                                f"{self.roster.at(step, self.every)} (clients_per_round)", "FAILED_PRECONDITION")

    def expected(self, step: int) -> set[int]:
        """The clients a training message or an average of ``step`` waits for: those its round sampled, but those given up."""
        return self.active & set(self.roster.at(step, self.every))

    def drop(self, clients, why: str = "it missed a round") -> None:
        """Give up on clients that vanished: rounds go on with the others; their later requests are refused."""
        for c in sorted(set(clients) if not isinstance(clients, int) else {clients}):
            if c not in self.dropped:
                self.dropped.add(c)
                log.warning(json.dumps({"event": "dropped", "client": c, "reason": why, "remaining": sorted(self.active)}))
                if self.turns is not None:
                    self.turns.skip(c)

    @property
    def batched(self) -> bool:
        return self.policy.batched(self.n)

    def turn_ends(self, step: int) -> bool:
        return self.policy.turn_ends(step, self.steps, self.every)

    def check(self, spec: SessionSpec, rejoining: bool = False) -> None:
        """A client joins only with the terms the group was formed with (``rejoining``: it replaces its own stale
        session, same run id)."""
        if spec.client in self.members and not rejoining:
            raise ValueError(f"client {spec.client} already has a session in this run")
        if not 0 <= spec.client < self.n:
            raise ValueError(f"client index {spec.client} is outside this run's clients 0..{self.n - 1}")
        theirs = spec.shared_terms()
        differ = sorted(k for k in self.terms if self.terms[k] != theirs.get(k))
        if differ:
            k = differ[0]
            raise ValueError(
                f"client {spec.client} proposes {k}={theirs.get(k)!r}, but this run agreed on {k}={self.terms[k]!r}"
                + (f" (and {len(differ) - 1} more differences: {', '.join(differ[1:])})" if len(differ) > 1 else "")
            )

    # -- forming ------------------------------------------------------------------------------------
    def form(self, source: ModelSource, arch: ArchSpec, config, device=None, bank: FrozenBank | None = None,
             spans=None) -> None:
        """Once every client said hello: load the blocks any of them needs and one adapter per trainer (on the frozen
        weights ``bank`` holds for the other runs of this process, when it is given; the later trunk spans through
        ``spans``, a ``SpanMaker``, when the trunk is cut into several: ``spans.py``)."""
        self.arch = arch
        self.blocks_path = arch.blocks_path
        first = self.members[0].spec
        if not self.policy.server_part:
            return
        ranges = {}
        for m in self.members.values():
            segs = m.spec.plan(arch.n_blocks).party_segments("server")
            m.start, m.end, m.head = segs[0].start, segs[0].end, segs[0].head
            ranges[m.index] = (m.start, m.end)
        lo = min(r[0] for r in ranges.values())
        hi = max(r[1] for r in ranges.values())
        cuts = [lo] if first.plan(arch.n_blocks).shape == "two-part" else [lo, hi]
        self._check_modes(first)
        spec = replace(first, cuts=cuts, lora_rank=first.lora["rank"], client=0)
        adapters = tuple(f"client{m}" for m in sorted(self.members)) if self.batched else ("default",)
        if self.batched and "full" in {first.segments[s.name] for s in spec.plan(arch.n_blocks).party_segments("server")}:
            raise ValueError("sfl-v1 keeps one server-side adapter per client; a segment trained in full would need a copy of it per client (use lora or frozen)")
        total = self.policy.server_steps(first.steps, self.roster.size)
        if spans is not None and spans.count > 1:
            self.party = self._spanned(source, arch, spec, config, adapters, total, device, spans, ranges)
        else:
            self.party = Party("server", source, arch, spec, config, adapters=adapters, total_steps=total, device=device,
                               recompute=spec.server_gradient_checkpointing)
        if bank is not None:
            bank.share(self.party.model, source.fingerprint())
        for m in self.members.values():
            m.adapter = adapters[m.index] if len(adapters) > 1 else adapters[0]

    def _spanned(self, source, arch, spec, config, adapters, total, device, spans, ranges) -> SpannedParty:
        """The trunk [a, b) in ``spans.count`` spans: the first here, the later ones made by ``spans``."""
        if len(spec.cuts) != 2 or self.batched or len(set(ranges.values())) > 1 or spec.loss_scale:
            raise ValueError(f"ray.trunk_spans={spans.count} runs a U-shaped split (cuts: [a, b]) whose clients share the "
                             "server's adapter and cuts, without float16 loss scaling (a two-part split's head, sfl-v1's "
                             "adapters per client, per-client cuts and loss scaling need ray.trunk_spans: 1)")
        (a, m), *later = bounds(spec.cuts[0], spec.cuts[1], spans.count)
        local = Party("server", source, arch, replace(spec, cuts=[a, m]), config, adapters=adapters, total_steps=total,
                      device=device, recompute=spec.server_gradient_checkpointing)
        return SpannedParty(local, [spans.make(replace(spec, cuts=[lo, hi]), lo, hi, adapters, total) for lo, hi in later])

    def _check_modes(self, first: SessionSpec) -> None:
        """Blocks that change hands between clients must train the same way on either side."""
        cuts = {tuple(m.spec.cuts) for m in self.members.values()}
        if len(cuts) == 1:
            return
        names = ["bottom", "trunk"] + (["top"] if len(first.cuts) == 2 else [])
        moved = {n: first.segments[n] for n in names}
        if len(set(moved.values())) > 1:
            raise ValueError(
                f"clients use different cuts {sorted(cuts)}, so blocks move between client and server segments; "
                f"those segments must train the same way, but segments are {moved}"
            )

    # -- checkpoints: what the server keeps of the run in ``--state`` --------------------------------------
    def state_root(self, state_dir: Path | None) -> Path:
        """The run's folder under ``state_dir``, named for its identity: its clients' run ids (each kept in the client's
        run directory) with the shared terms, so two runs of one config, or two data owners with the same settings,
        never share one. The step count is left out: a finished run continued with more steps is the same run."""
        if state_dir is None:
            raise ProtocolError("this server keeps no checkpoints (start it with --state DIR to resume runs)", "FAILED_PRECONDITION")
        runs = sorted((i, m.spec.run_id) for i, m in self.members.items())
        terms = {k: v for k, v in self.terms.items() if k != "steps"}
        key = hashlib.sha256(json.dumps([terms, runs], sort_keys=True).encode()).hexdigest()[:16]
        return state_dir / f"run-{key}"

    def save(self, state_dir: Path | None, step: int) -> None:
        groups, meta = self.party.checkpoint() if self.party is not None else ({}, {})
        groups["global"], groups["group_folded"] = dict(self.global_state), dict(self.folded)
        groups["relay"] = dict(self.relay[0]) if self.relay else {}
        caches = {i: m.cache for i, m in self.members.items() if m.cache is not None}
        groups.update({f"cache.{i}": cache.tensors() for i, cache in caches.items()})
        meta.update(step=step, turns=self.turns.position if self.turns else None,
                    relay=self.relay[1] if self.relay else None, dropped=sorted(self.dropped),
                    caches={str(i): cache.order() for i, cache in caches.items()})
        checkpoint.save(self.state_root(state_dir), step, checkpoint.pack(groups), meta)

    def restore(self, state_dir: Path | None, step: int) -> None:
        root = self.state_root(state_dir)
        problem = checkpoint.damage(root / f"step-{step}")
        if problem is not None and problem != "missing":
            raise ProtocolError(f"cannot resume: the server's checkpoint of step {step} is damaged ({problem})", "FAILED_PRECONDITION")
        try:
            flat, meta = checkpoint.load(root, step)
        except FileNotFoundError as err:
            raise ProtocolError(f"cannot resume: {err}", "FAILED_PRECONDITION") from None
        groups = checkpoint.unpack(flat)
        if self.party is not None:
            self.party.restore(groups, meta)
        device = self.party.device if self.party is not None else torch.device("cpu")  # where new averages will be
        self.global_state, self.folded = groups.get("global", {}), to_device(groups.get("group_folded", {}), device)
        self.averaged = step // self.every * self.every  # (a run averages at the end of each round)
        if meta.get("relay") is not None:
            self.relay = (groups.get("relay", {}), meta["relay"])
        if self.turns is not None:
            self.turns.position = meta["turns"]
        for i, m in self.members.items():  # the activation caches, within today's budgets
            if m.cache is not None:
                m.cache.load(meta.get("caches", {}).get(str(i), []), groups.get(f"cache.{i}", {}), device)

    # -- what the server trains on a client's behalf ----------------------------------------------------
    def on_behalf(self, member: Member) -> dict[str, torch.Tensor]:
        """The server-side tensors trained with ``member``'s data: its adapter, blocks [start, end) (and head)."""
        if self.party is None:
            return {}
        return {k: v for k, v in self.party.state(member.adapter).items() if self._serves(member, k)}

    def _serves(self, member: Member, name: str) -> bool:
        block = block_of(name, self.blocks_path)
        if block is None:  # outside the blocks: the final norm or head, held only when the server ends the model
            return member.head
        return member.start <= block < member.end

    # -- stage 7 ---------------------------------------------------------------------------------------
    def aggregate(self, items: dict[int, tuple[dict[str, torch.Tensor], float]], step: int = 0) -> dict[int, dict[str, torch.Tensor]]:
        """Average every client's adapters (its own and those the server trained for it) at ``step``; apply the
        server's share; return each client's share: new values and folds for the tensors it holds."""
        alpha = float(self.terms["lora"]["alpha"])
        contributions = []
        for index, (tensors, weight) in items.items():
            member = self.members[index]
            own = dict(tensors)
            overlap = set(own) & set(self.on_behalf(member))
            if overlap:
                raise ValueError(f"client {index} sent tensors the server holds for it, e.g. {sorted(overlap)[:2]}")
            contributions.append(Contribution(weight, {**own, **self.on_behalf(member)}, alpha))
        shares = self._apply(average(contributions), {index: set(tensors) for index, (tensors, _) in items.items()})
        self.averaged = max(self.averaged, step)  # (once the global state is in: a client may be waiting for it)
        return shares

    def aggregate_sum(self, total, weights: dict[int, float]) -> dict[int, dict[str, torch.Tensor]]:
        """Stage 7 under secure aggregation: the survivors' own tensors arrive only as their weighted sum
        (``dpmath.secagg.Aggregate``); what the server trained for them is averaged here, as ``aggregate`` does."""
        dtype = DTYPES[self.terms["dtype"]]
        own = {name: (t / total.weight).to(dtype) for name, t in total.tensors.items()}
        alpha = float(self.terms["lora"]["alpha"])
        behalf = [Contribution(weights[i], self.on_behalf(self.members[i]), alpha)
                  for i in total.survivors if self.on_behalf(self.members[i])]
        result = average(behalf) if behalf else Average()
        if set(result.tensors) & set(own):
            raise ValueError(f"clients sent tensors the server holds for them, e.g. {sorted(set(result.tensors) & set(own))[:2]}")
        result.tensors.update(own)
        return self._apply(result, {i: set(own) for i in total.survivors})

    def _apply(self, result: Average, sent: dict[int, set[str]]) -> dict[int, dict[str, torch.Tensor]]:
        """An average taken: the global state, the server's share applied, each client's share (``sent``: the names
        each client sent)."""
        self.global_state = dict(result.tensors)
        deltas = {module: result.delta(module) for module in result.folds}
        for module, delta in deltas.items():
            self.folded[module] = self.folded.get(module, 0) + delta
        self._apply_server_share(result.tensors, deltas)
        replies = {}
        for index, tensors in sent.items():
            keep = self._personal_names(self.members[index], tensors)
            share = {k: v for k, v in result.tensors.items() if k in tensors and k not in keep}
            for module, (b, a) in result.folds.items():
                if f"{module}.lora_A.weight" in tensors and f"{module}.lora_A.weight" not in keep:
                    share.update(tag(FOLD, {f"{module}::B": b, f"{module}::A": a}))
            replies[index] = share
        return replies

    def _personal_names(self, member: Member, tensors: dict[str, torch.Tensor]) -> set[str]:
        """Tensors of the segments this client keeps for itself."""
        if not self.personal or self.party is None:
            return set()
        plan = member.spec.plan(len(self.party.blocks))
        return personal_names(tensors, plan, self.personal, self.arch)

    def _apply_server_share(self, tensors: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> None:
        if self.party is None:
            return
        for module, delta in deltas.items():
            if self.party.holds(module):
                self.party.fold(module, delta)
        for adapter in sorted({m.adapter for m in self.members.values()}):
            held = self.party.state(adapter)
            self.party.load_state({k: v for k, v in tensors.items() if k in held}, adapter)
