"""The trunk engine: the server's compute, apart from its protocol (DESIGN.md: handler / engine, as in
Petals' ``handler.py`` / ``backend.py``).

One worker thread takes jobs from a queue and runs them on the one server model: micro-batch forwards
(kept until their gradients arrive), backwards, the sfl-v1 batched forward of several clients' rows,
optimizer steps and state snapshots. Handlers validate and wait for turns or rounds on their own
threads, then hand the engine a job and wait for its result, so computations never interleave on the
model (its hooks and adapter routing are per call) and the server computes while clients compute.
Grad mode is thread-local, so every job sets its own.
"""

from __future__ import annotations

import functools
import queue
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ... import workers
from ...data.choices import candidate_scores
from ...models.routing import ROUTER
from ...models.stages import segment_failures
from ..party import Party
from ..precision import finite


@dataclass
class Rows:
    """One client's part of an sfl-v1 batched forward: its activations and mask, and for a two-part split its labels,
    token count and router sums; ``want_grad``: whether it wants the gradient at its cut back."""

    hidden: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor | None = None
    num_items: int | None = None
    want_grad: bool = True
    sums: torch.Tensor | None = None
    scale: float | None = None  # float16: the client's loss scale, for its loss


@dataclass
class Pending:
    """A training forward awaiting its gradient: the input (its ``.grad`` goes back), the output and its router sums;
    a batched one (sfl-v1) also names the clients whose rows it holds, in order, and how many each."""

    hidden_in: torch.Tensor
    hidden_out: torch.Tensor
    router: torch.Tensor | None = None
    clients: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


class TrunkEngine:
    def __init__(self, name: str = "splittune-trunk"):
        self._jobs: queue.Queue = queue.Queue()
        stop = functools.partial(self._jobs.put, None)
        self._thread = workers.start(_work, (self._jobs,), name, stop)
        weakref.finalize(self, stop)  # an engine nobody holds stops its thread
        self.party: Party | None = None
        self.batched = False  # sfl-v1 with several clients: rows are routed to their own adapters
        self.pending: dict[tuple, Pending] = {}  # forwards awaiting their gradients
        self.overflowed: set[str] = set()  # float16: adapters whose step sent zeros for a gradient that overflowed

    def run(self, fn: Callable, *args) -> Any:
        """Run ``fn(*args)`` on the engine thread and return its result (inline when already on it)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        future: Future = Future()
        self._jobs.put((fn, args, future))
        return future.result()

    def close(self) -> None:
        self._jobs.put(None)

    def reset(self, party: Party | None, batched: bool) -> None:
        self.party, self.batched = party, batched
        self.pending.clear()
        self.overflowed.clear()

    def _finite(self, adapter: str, grad: torch.Tensor | None) -> torch.Tensor | None:
        """In float16, a gradient fit to go back over the cut (zeros for one that overflowed, remembered for ``adapter``'s
        step); otherwise the gradient as it is (a NaN there is a fault the client must hear of, not an overflow)."""
        if self.party.session.loss_scale == "":
            return grad
        grad, bad = finite(grad)
        if bad:
            self.overflowed.add(adapter)
        return grad

    # -- what runs on the engine thread ---------------------------------------------------------------
    def _routes(self, adapter: str, rows: int) -> list[str] | None:
        """This client's server-side adapter for its rows (several share one base under sfl-v1)."""
        return [adapter] * rows if self.batched else None

    def forward(self, key: tuple, adapter: str, start: int, end: int, hidden, mask, train: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Trunk blocks [start, end) and their router sums (None without a router loss); a training forward is kept
        until its gradient comes (``key``)."""
        routes = self._routes(adapter, hidden.shape[0])
        with torch.set_grad_enabled(train):
            if not train:
                return self.party.run(start, end, hidden=hidden, attention_mask=mask, routes=routes, head=False).hidden, None
            hidden.requires_grad_(True)
            out = self.party.run(start, end, hidden=hidden, attention_mask=mask, routes=routes, head=False)
        self.pending[key] = Pending(hidden, out.hidden, out.router)
        return out.hidden.detach(), None if out.router is None else out.router.detach()

    def head(self, adapter: str, start: int, end: int, hidden, mask, labels, num_items, train: bool, want_grad: bool,
             scores: tuple[list[int], list[int]] | None, sums: torch.Tensor | None = None,
             scale: float | None = None) -> tuple[float, dict, torch.Tensor | None]:
        """Two-part split: the server ends the model and computes the loss from the client's labels (and, with a
        router loss, the bottom's router ``sums``; in float16, the client's loss ``scale``). Returns the loss, the gradients
        at the cut (training: ``grad``, and ``router`` for the sums) and candidate scores (evaluation)."""
        routes = self._routes(adapter, hidden.shape[0])
        with torch.set_grad_enabled(train):
            if not train:
                out = self.party.run(start, end, hidden=hidden, attention_mask=mask, labels=labels, num_items_in_batch=num_items,
                                     want_logits=scores is not None, routes=routes)
                return float(out.loss), None, None if scores is None else candidate_scores(out.logits, *scores)
            hidden.requires_grad_(want_grad)
            out = self.party.run(start, end, hidden=hidden, attention_mask=mask, labels=labels, num_items_in_batch=num_items,
                                 routes=routes)
            sums = None if sums is None else sums.detach().requires_grad_(want_grad)
            loss = self.party.add_aux(out.loss, sums, out.router)
            with segment_failures(self.party, start, end, backward=True):
                (loss if scale is None else loss * scale).backward()
        grads = {"grad": self._finite(adapter, hidden.grad)} if want_grad else {}
        if want_grad and sums is not None:
            grads[ROUTER] = self._finite(adapter, sums.grad)
        return float(loss.detach()), grads, None

    def backward(self, key: tuple, adapter: str, grad: torch.Tensor, sums_grad: torch.Tensor | None = None) -> torch.Tensor | None:
        pending = self.pending.pop(key)
        trunk = self.party.segments[0]
        with torch.enable_grad(), segment_failures(self.party, trunk.start, trunk.end, head=False, backward=True):
            _backward(pending.hidden_out, grad, pending.router, sums_grad)
        return self._finite(adapter, pending.hidden_in.grad)

    def forward_together(self, step: int, micro: int, items: dict, members: dict, vocab: int) -> dict:
        """sfl-v1: the clients' activations of one micro-batch (``items``: each client's ``Rows``) go through the shared
        base as one batch, each row through its own client's adapter; clients entering at other blocks form their own batch."""
        party = self.party
        buckets: dict[tuple, list[int]] = {}
        for i, part in items.items():
            m = members[i]
            buckets.setdefault((m.start, m.end, part.hidden.shape[1]), []).append(i)
        results = {}
        with torch.enable_grad():
            for (start, end, _), idx in buckets.items():
                hidden = torch.cat([items[i].hidden for i in idx]).requires_grad_(True)
                mask = torch.cat([items[i].mask for i in idx])
                rows = [items[i].hidden.shape[0] for i in idx]
                names = [members[i].adapter for i, r in zip(idx, rows) for _ in range(r)]
                head = members[idx[0]].head
                out = party.run(start, end, hidden=hidden, attention_mask=mask, want_logits=head, routes=names, head=head)
                own = [None] * len(idx) if out.router is None else out.router.split(rows)
                if head:
                    base = party.model.get_base_model() if hasattr(party.model, "get_base_model") else party.model
                    sent = [None if items[i].sums is None else items[i].sums.detach().requires_grad_(True) for i in idx]
                    losses = [
                        party.add_aux(base.loss_function(logits=logits, labels=items[i].labels, vocab_size=vocab,
                                                         num_items_in_batch=items[i].num_items), theirs, mine)
                        for i, logits, theirs, mine in zip(idx, out.logits.split(rows), sent, own)
                    ]
                    scaled = [x if items[i].scale is None else x * items[i].scale for i, x in zip(idx, losses)]
                    with segment_failures(party, start, end, head=True, backward=True):
                        torch.stack(scaled).sum().backward()
                    for i, grad, loss, theirs in zip(idx, hidden.grad.split(rows), losses, sent):
                        adapter = members[i].adapter
                        grads = {"grad": self._finite(adapter, grad)} if items[i].want_grad else {}
                        if items[i].want_grad and theirs is not None:
                            grads[ROUTER] = self._finite(adapter, theirs.grad)
                        results[i] = ("gradients", grads, {"loss": float(loss.detach())})
                else:
                    self.pending[("batch", step, micro, start, end, hidden.shape[1])] = Pending(hidden, out.hidden, out.router, idx, rows)
                    for i, h, mine in zip(idx, out.hidden.detach().split(rows), own):
                        results[i] = ("activations", {"hidden": h} if mine is None else {"hidden": h, ROUTER: mine.detach()}, {})
        return results

    def batch_of(self, step: int, micro: int, client: int) -> Pending | None:
        """The pending batched forward of (step, micro) that holds ``client``'s rows."""
        found = [v for k, v in self.pending.items() if k[:3] == ("batch", step, micro) and client in v.clients]
        return found[0] if found else None

    def backward_together(self, step: int, micro: int, items: dict, members: dict) -> dict:
        """``items``: each client's (gradient, router sums' gradient or None)."""
        results = {}
        with torch.enable_grad():
            for key in [k for k in self.pending if k[:3] == ("batch", step, micro)]:
                pending = self.pending.pop(key)
                hidden_in, hidden_out, idx, rows, sums = pending.hidden_in, pending.hidden_out, pending.clients, pending.rows, pending.router
                # a client given up in the middle of the step contributes no gradient

                def part(i, r, t, j):
                    got = items[i][j] if i in items else None
                    return got if got is not None else torch.zeros((r, *t.shape[1:]), dtype=t.dtype, device=t.device)

                sums_grad = None if sums is None else torch.cat([part(i, r, sums, 1) for i, r in zip(idx, rows)])
                with segment_failures(self.party, key[3], key[4], head=False, backward=True):
                    _backward(hidden_out, torch.cat([part(i, r, hidden_out, 0) for i, r in zip(idx, rows)]), sums, sums_grad)
                results.update((i, self._finite(members[i].adapter, g)) for i, g in zip(idx, hidden_in.grad.split(rows)) if i in items)
        return results

    def waiting(self, client: int) -> list[tuple]:
        """Forwards of ``client`` still awaiting gradients."""
        return [k for k, v in self.pending.items() if k[0] == client or (k[0] == "batch" and client in v.clients)]

    def forget(self, client: int, adapter: str) -> None:
        """A client vanished in its turn: drop its half-done step (pending forwards, gradients it left)."""
        for key in [k for k in self.pending if k[0] == client]:
            del self.pending[key]
        self.overflowed.discard(adapter)
        trainer = self.party.trainers[adapter] if self.party else None
        if trainer is not None and trainer.optimizer is not None:
            trainer.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.party, "spans"):  # a spanned trunk: its later spans too (``spans.py``)
            self.party.forget(adapter)

    def step(self, adapter: str, client_sq: float, scale: float | None = None, overflow: bool = False,
             catch_up: int | None = None) -> tuple[float, float, bool]:
        """Stage 6 for one adapter with the global gradient norm; returns this side's squared norm, the LR and whether
        this side overflowed. In float16 the gradients are first divided by the client's loss ``scale``; an overflow
        on either side (the client's ``overflow``) skips the step. ``catch_up``: the step, when rounds that did not
        sample this adapter's client left its LR schedule behind."""
        if catch_up is not None:
            self.party.catch_up(catch_up, adapter)
        mine = False
        if scale is not None:
            mine = self.party.unscale(scale, adapter) or adapter in self.overflowed
        self.overflowed.discard(adapter)
        own = 0.0 if mine else self.party.sq_grad_norm(adapter)
        self.party.optimizer_step(client_sq + own, adapter, skip=mine or overflow)
        return own, self.party.lr_of(adapter), mine


def _backward(hidden_out: torch.Tensor, grad: torch.Tensor, sums: torch.Tensor | None, sums_grad: torch.Tensor | None) -> None:
    """Back-propagate the trunk's output gradient and, with a router loss, its router sums' gradient together."""
    if sums is None or sums_grad is None or not sums.requires_grad:
        hidden_out.backward(grad)
    else:
        torch.autograd.backward([hidden_out, sums], [grad, sums_grad])


def _work(jobs: queue.Queue) -> None:
    """The engine's thread (a function of the queue, not a method: it must not keep the engine alive)."""
    while True:
        job = jobs.get()
        if job is None:
            return
        fn, args, future = job
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # the handler waiting for it re-raises it
            future.set_exception(err)
        del job, fn, args, future
