"""The client party: stage 1 (bottom forward), stage 4 (top forward and loss, U-shape), its half of
stage 5, and the driver of a step. It holds the data and, in the U-shaped split, the labels.

With no server (``mode: centralized``) the same class runs the whole model locally: the baseline
shares every line of data handling, optimisation and evaluation with the split run.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import torch

from ...channels import RemoteError
from ...cut.link import CutLink, Pending
from ...cut.transforms import needed_positions
from ...data.choices import candidate_scores
from ...defenses import ClientDefenses
from ...device import to_device
from ...models.routing import ROUTER
from ...models.stages import segment_failures
from ...wire import Message
from ...averaging import fold_delta
from ...wire.names import FOLD, OPT, split, tag
from ..cache import CACHE_MISS, Mirror, entry_bytes, row_keys, why_off
from .batches import Batch, count_items, leaf, split_rows
from .report import StepReport, Traffic
from ..party import Party
from ..precision import finite
from ..secure import client_round


@dataclass
class _Micro:
    """One micro-batch on its way through the pipeline."""

    index: int
    batch: Batch
    hidden: torch.Tensor | None = None  # the bottom's output, kept for the backward
    pending: Pending | None = None  # the message in flight for it
    top: torch.Tensor | None = None  # U-shape: the top's input, whose gradient goes back to the server
    stage: int = 0  # 1: forward sent; 2: top gradient sent (U-shape); 3: done
    loss: float = 0.0
    want_grad: bool = False  # the bottom trains: its activations' gradient comes back
    share: float = 1.0  # this micro-batch's rows over the step's (weights a defense's term on the bottom)
    offset: int = 0  # the step's index of this micro-batch's first example (DP-SGD's per-example gradients)
    penalty: dict[str, torch.Tensor] | None = None  # the defenses' terms on the bottom's loss (NoPeek), back-propagated with it
    router: torch.Tensor | None = None  # the bottom's router sums (MoE auxiliary loss), back-propagated with it
    router_grad: torch.Tensor | None = None  # their gradient, from whichever party ends the model


class Client:
    """``link`` is this client's end of the cut (None for centralized and federated runs, which only average).

    ``micro_batches`` cuts every batch into that many micro-batches that flow through the cut concurrently,
    at most ``max_in_flight`` at once (back-pressure bounds the activations both parties hold).
    """

    def __init__(self, party: Party, link: CutLink | None = None, micro_batches: int = 1, max_in_flight: int | None = None,
                 defenses: ClientDefenses | None = None):
        self.party = party
        self.plan = party.plan
        self.link = link
        self.session = link.session if link is not None else uuid.uuid4().hex[:12]
        self.micro_batches = micro_batches
        self.max_in_flight = max_in_flight or micro_batches
        self.server_info: dict = {}
        self.split = self.plan.shape != "centralized"  # a federated client trains the whole model and talks only to average
        if self.split and link is None:
            raise ValueError(f"a {self.plan.shape} split needs a link to the server")
        self.cache: Mirror | None = None  # the activation cache's mirror, when the session can use one
        self.cache_off: str | None = None if self.split else "nothing crosses a cut"
        self._bottom_s = 0.0  # time in the bottom's training forwards this step
        # called with (session, step, micro, batch) as each training micro-batch is first sent (a run recording its taps)
        self.recorder: Callable[[str, int, int, Batch], None] | None = None
        # the defenses that act inside this client (its bottom, its loss, its gradients: ``defenses/``); the chain's own
        # defense slot is its link's
        self.defenses = defenses if defenses is not None else ClientDefenses([])
        self._penalties: dict[str, float] = {}  # each defense's terms added to the bottom's loss this step
        self._overflow = False  # float16: a gradient this client computed this step overflowed (``parties/precision.py``)

    def connect(self, resume: int | None = None, link_state: dict | None = None) -> dict:
        """Stage 0: propose the session and the chain; the server builds its part from it (restored to step
        ``resume``, the chain from ``link_state``) or says why not."""
        if self.link is not None:
            meta = self.party.session.to_meta()
            if resume is not None:
                meta["resume"] = resume
            self.server_info = dict(self.link.hello(meta, link_state).meta)
            if self.split:
                budget = int(self.server_info.get("cache_bytes", 0))
                noisy = self.defenses.varies()
                self.cache_off = why_off(self.party, self.link.chain, budget, self.party.session.cache_bytes) or noisy
                self.cache = Mirror(budget) if self.cache_off is None else None
        return self.server_info

    def _send(self, kind: str, step: int, micro: int, tensors: dict, **meta) -> Pending:
        return self.link.send(Message(kind, self.session, step, micro, tensors, meta))

    def _take(self, pending: Pending) -> Message:
        reply = pending.result()
        reply.tensors = to_device(reply.tensors, self.party.device)
        return reply

    def _call(self, kind: str, step: int, micro: int, tensors: dict, **meta) -> Message:
        return self._take(self._send(kind, step, micro, tensors, **meta))

    # -- stages 1-5 for the micro-batches of a step ---------------------------------------------------------
    def _launch(self, step: int, m: _Micro, num_items: int, resend: bool = False) -> None:
        """Stage 1 and the crossing of the bottom cut. A bottom that trains nothing runs without autograd: it
        keeps no graph, and its activations ask for no gradient back (``want_grad`` follows ``requires_grad``).
        With the activation cache only the rows the server does not hold are computed and sent."""
        batch, bottom = m.batch, self.plan.segment("bottom")
        if self.recorder is not None and not resend:
            self.recorder(self.session, step, m.index, batch)
        keep = needed_positions(batch["attention_mask"], batch["labels"])
        tensors = {"attention_mask": batch["attention_mask"], "cut.keep": keep}
        rows, meta = self._cached(batch, keep, resend)
        t0 = time.perf_counter()
        m.hidden = None
        if rows is None or rows:
            ids, mask = (batch["input_ids"], batch["attention_mask"]) if rows is None else (batch["input_ids"][rows], batch["attention_mask"][rows])
            self.defenses.at(m.offset)
            with torch.set_grad_enabled(self.party.trains(bottom)):
                m.hidden, m.penalty, m.router = self._bottom(ids, mask, m.share, (step, m.index))
            tensors["hidden"] = m.hidden.detach()
            if m.router is not None and self.plan.shape == "two-part":  # the server ends the model and its router loss
                tensors[ROUTER] = m.router.detach()
            if rows is not None:
                tensors["cut.rows"] = torch.tensor(rows)
        else:
            self.cache.counts["bottom_forwards_skipped"] += 1
        self._bottom_s += time.perf_counter() - t0
        m.want_grad = m.hidden is not None and m.hidden.requires_grad
        if self.plan.shape == "two-part":
            tensors["labels"] = batch["labels"]
            scale = self.party.loss_scale()
            if scale is not None:
                meta["loss_scale"] = scale.scale
            m.pending = self._send("activations", step, m.index, tensors, train=True, num_items=num_items, want_grad=m.want_grad, **meta)
        else:
            m.pending = self._send("activations", step, m.index, tensors, train=True, **meta)
        m.stage = 1

    def _cached(self, batch: Batch, keep: torch.Tensor, resend: bool) -> tuple[list[int] | None, dict]:
        """The rows to compute and send under the activation cache (None: every row) and the meta that says so.
        The mirror takes the operations the server will take; ``resend``: the server lacked rows the mirror
        holds, so both ends start afresh and every row is sent."""
        cache = self.cache
        if cache is None or "sample_id" not in batch:
            return None, {}
        keys = row_keys(cache.secret, self.party.session.fingerprint, self.plan.segment("bottom").end, batch)
        if resend:
            cache.clear()
            cache.counts["resent"] += len(keys)
        sent = cache.missing(keys)
        hits = sorted(set(range(len(keys))) - set(sent))
        seq, width = keep.shape[1], self.party.model.config.get_text_config().hidden_size
        if hits:  # what their activations would have cost in this frame
            chain = self.link.chain
            shape = (int(keep[hits].sum()), width) if chain.packs("up") else (len(hits), seq, width)
            cache.counts["bytes_saved_up"] += chain.payload_bytes("up", "hidden", self.party.dtype, shape)
        cache.take(keys, sent, entry_bytes(seq, width, self.party.dtype))
        meta = {"keys": keys, "sent": sent, **({"reset": True} if resend else {})}
        return (None if len(sent) == len(keys) else sent), {"cache": meta}

    def _bottom(self, ids: torch.Tensor, mask: torch.Tensor, share: float = 1.0,
                key: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, torch.Tensor | None]:
        """The bottom's activations at the first cut, through the client's own defenses; their term on the
        bottom's loss (None without one; evaluations never train); the bottom's router sums (None without a router
        loss). ``key``: the training (step, micro-batch); (0, 0) for an evaluation."""
        end = self.plan.segment("bottom").end
        if not self.defenses.active:
            out = self.party.run(0, end, input_ids=ids, attention_mask=mask)
            return out.hidden, None, out.router
        with self.defenses.bottom(*key) as box:
            out = self.party.run(0, end, input_ids=ids, attention_mask=mask)
        return out.hidden, self.defenses.penalty(box, out.hidden, mask, share) if torch.is_grad_enabled() else None, out.router

    def cache_counts(self) -> dict[str, int]:
        """The activation cache's counts so far (hits, misses, evictions, resent rows, skipped forwards, bytes saved)."""
        return dict(self.cache.counts) if self.cache is not None else {}

    def _advance(self, step: int, m: _Micro, num_items: int) -> None:
        """Take ``m``'s reply and do its next stage: the top (U-shape) or the bottom's backward."""
        try:
            reply = self._take(m.pending)
        except RemoteError as err:  # the server lacks rows the mirror holds: send them all again
            if err.code != CACHE_MISS or m.stage != 1 or self.cache is None:
                raise
            self._launch(step, m, num_items, resend=True)
            reply = self._take(m.pending)
        if m.stage == 1 and self.plan.shape == "u-shape":
            top = self.plan.segment("top")
            m.top = reply.tensors["hidden"].requires_grad_(True)
            self.defenses.at(m.offset)
            out = self.party.run(top.start, top.end, hidden=m.top, attention_mask=m.batch["attention_mask"],
                                 labels=m.batch["labels"], num_items_in_batch=num_items)
            bottom_sums, trunk_sums = (leaf(m.router), leaf(reply.tensors.get(ROUTER)))
            loss = self.party.add_aux(out.loss, bottom_sums, trunk_sums, out.router)
            with segment_failures(self.party, top.start, top.end, backward=True):
                self._scaled(loss).backward()
            m.loss = float(loss.detach())
            m.router_grad = bottom_sums.grad if bottom_sums is not None else None
            grads = {"grad": self._finite(m.top.grad), "cut.labels": m.batch["labels"]}
            if trunk_sums is not None:
                grads[ROUTER] = self._finite(trunk_sums.grad)
            m.pending = self._send("gradients", step, m.index, grads, want_grad=m.want_grad)
            m.stage = 2
            return
        if m.stage == 1:
            m.loss = float(reply.meta["loss"])
            m.router_grad = reply.tensors.get(ROUTER)
        if m.want_grad:
            outputs, grads = [m.hidden], [reply.tensors["grad"]]
            for name, term in (m.penalty or {}).items():
                outputs.append(term)
                grads.append(self._scaled(torch.ones_like(term)))
                self._penalties[name] = self._penalties.get(name, 0.0) + float(term.detach())
            if m.router is not None and m.router_grad is not None and m.router.requires_grad:
                outputs.append(m.router)
                grads.append(m.router_grad)
            with segment_failures(self.party, 0, self.plan.segment("bottom").end, backward=True):
                torch.autograd.backward(outputs, grads)
        m.hidden = m.top = m.pending = m.penalty = m.router = m.router_grad = None
        m.stage = 3

    def _pipeline(self, step: int, batches: list[Batch], num_items: int) -> float:
        """Every micro-batch through the cut, up to ``max_in_flight`` at once.

        The order of every action depends only on the micro-batch indices, never on when replies come:
        forwards are sent in index order; when the window is full the oldest unfinished micro-batch takes its
        next stage; at the end every top runs in index order, then every bottom backward. Gradients therefore
        accumulate in the same order on both parties as without pipelining, and the step is bit-identical.
        """
        sizes = [b["input_ids"].shape[0] for b in batches]
        rows = sum(sizes)
        micros = [_Micro(i, to_device(b, self.party.device), share=sizes[i] / rows, offset=sum(sizes[:i])) for i, b in enumerate(batches)]
        for m in micros:
            while sum(1 for x in micros if x.stage in (1, 2)) >= self.max_in_flight:
                oldest = next(x for x in micros if x.stage in (1, 2))
                self._advance(step, oldest, num_items)
            self._launch(step, m, num_items)
        for stage in (1, 2):
            for m in micros:
                if m.stage == stage:
                    self._advance(step, m, num_items)
        return sum(m.loss for m in micros)

    def train_step(self, step: int, batches: list[Batch]) -> StepReport:
        """Forward and backward every micro-batch, then one optimizer step on both parties; returns the step's report.

        Each micro-batch's loss is its token sum divided by the tokens of the *whole* step, so the
        accumulated gradient is that of one big batch, whatever the micro-batch split.
        """
        self._bottom_s, self._penalties, self._overflow = 0.0, {}, False
        counts = self.cache_counts()
        started = time.perf_counter()
        measured = self.link.measured() if self.link is not None else contextlib.nullcontext()
        with self.traffic() as sent, measured as stats:
            loss, num_items = self.backward(step, batches)
            self.defenses.before_optimizer()  # DP-SGD: the client's gradients clipped per example and noised, before the global norm
            lr = self.party.lr
            scale = self.party.loss_scale()
            scale = None if scale is None else scale.scale
            skipped = self.optimizer_step(step)
        report = StepReport(loss, num_items, lr, sent.up, sent.down, time.perf_counter() - started, penalty=sum(self._penalties.values()),
                            figures=self.defenses.figures(self._penalties), loss_scale=scale, skipped=skipped)
        if stats is not None:
            report.link, report.bottom_s = stats.figures(), self._bottom_s
        if counts:
            now = self.cache_counts()
            report.cache_hits, report.cache_misses = now["hits"] - counts["hits"], now["misses"] - counts["misses"]
        return report

    def traffic(self) -> contextlib.AbstractContextManager[Traffic]:
        """The bytes this client's link carries during the block (its channel's meter; nothing without a link)."""
        return self.link.channel.metered() if self.link is not None else contextlib.nullcontext(Traffic())

    @property
    def defended(self) -> bool:
        """Whether a defense changes what this client evaluates (its embeddings, or what crosses its link)."""
        chain = self.link.chain if self.link is not None else None
        return self.defenses.perturbs() or (chain is not None and any(t.perturbs for t in chain.transforms[chain.sending]))

    @contextlib.contextmanager
    def undefended(self):
        """Evaluate without this client's defenses: what the adapter does on its own. Only for in-process runs: over a
        network the server would see undefended activations."""
        chain = self.link.chain if self.link is not None else None
        self.defenses.paused = True
        try:
            with chain.undefended() if chain is not None else contextlib.nullcontext():
                yield
        finally:
            self.defenses.paused = False

    def backward(self, step: int, batches: list[Batch]) -> tuple[float, int]:
        """Stages 1–5 for every micro-batch (each of ``batches`` cut into ``micro_batches``): gradients
        accumulate on both parties."""
        num_items = sum(count_items(b["labels"]) for b in batches)
        if num_items == 0:
            raise ValueError(f"step {step}: no label carries loss (every label is -100)")
        micros = [m for b in batches for m in split_rows(b, self.micro_batches)]
        self.defenses.begin(sum(m["input_ids"].shape[0] for m in micros))
        if self.plan.shape != "centralized":
            return self._pipeline(step, micros, num_items), num_items
        loss = 0.0
        for i, b in enumerate(micros):
            if self.recorder is not None:  # a federated client's batches: what its adapter updates are computed from
                self.recorder(self.session, step, i, b)
            b = to_device(b, self.party.device)
            self.defenses.at(sum(x["input_ids"].shape[0] for x in micros[:i]))
            out = self.party.run(0, self.plan.n_blocks, input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 labels=b["labels"], num_items_in_batch=num_items)
            total = self.party.add_aux(out.loss, out.router)
            with segment_failures(self.party, 0, self.plan.n_blocks, backward=True):
                self._scaled(total).backward()
            loss += float(total.detach())
        return loss, num_items

    def optimizer_step(self, step: int) -> bool:
        """Stage 6 on both parties, with the global gradient norm. In float16 each party first divides its gradients
        by the client's loss scale, and an overflow on either skips the step on both (``parties/precision.py``);
        returns whether it was skipped."""
        scale = self.party.loss_scale()
        overflow = self._overflow or (scale is not None and self.party.unscale(scale.scale))
        own = 0.0 if overflow else self.party.sq_grad_norm()
        server_sq = 0.0
        if self.split:
            extra = {} if scale is None else {"loss_scale": scale.scale, "overflow": overflow}
            reply = self._call("step", step, 0, {}, sq_norm=own, **extra)
            server_sq = float(reply.meta["sq_norm"])
            overflow = overflow or bool(reply.meta.get("overflow", False))
        self.party.optimizer_step(own + server_sq, skip=overflow)
        if scale is not None:
            scale.update(overflow)
        return overflow

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss (or a gradient seeded on a term of it) times the float16 loss scale, when there is one."""
        scale = self.party.loss_scale()
        return loss if scale is None else loss * scale.scale

    def _finite(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        """In float16, a gradient fit to cross the cut: zeros for one that overflowed, whose step is then skipped."""
        if self.party.loss_scale() is None:
            return grad
        grad, bad = finite(grad)
        self._overflow = self._overflow or bad
        return grad

    # -- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_batch(self, batch: Batch, score: tuple[list[int], list[int]] | None = None) -> tuple[float, int, torch.Tensor | None]:
        """Loss *sum* and token count of one batch; optionally candidate-token logits at given positions."""
        batch = to_device(batch, self.party.device)
        items = count_items(batch["labels"])
        evaluate = self._eval_on_server if self.plan.shape == "two-part" else self._eval_here
        loss, scores = evaluate(batch, items, score)
        return loss * items, items, None if scores is None else scores.cpu()

    def _eval_here(self, batch: Batch, items: int, score) -> tuple[float, torch.Tensor | None]:
        """Centralized and U-shape: this side ends the model, so loss and logits are computed here."""
        party, plan = self.party, self.plan
        ids, mask = batch["input_ids"], batch["attention_mask"]
        ending = dict(attention_mask=mask, labels=batch["labels"] if items else None, num_items_in_batch=items or None,
                      want_logits=score is not None)
        if plan.shape == "centralized":
            out = party.run(0, plan.n_blocks, input_ids=ids, **ending)
        else:
            top = plan.segment("top")
            h, _, _ = self._bottom(ids, mask)
            keep = needed_positions(mask, batch["labels"])
            reply = self._call("activations", 0, 0, {"hidden": h, "attention_mask": mask, "cut.keep": keep}, train=False)
            out = party.run(top.start, top.end, hidden=reply.tensors["hidden"], **ending)
        loss = float(out.loss) if out.loss is not None else 0.0
        return loss, None if score is None else candidate_scores(out.logits, *score)

    def _eval_on_server(self, batch: Batch, items: int, score) -> tuple[float, torch.Tensor | None]:
        """Two-part: the server ends the model; it returns the loss and candidate scores, never whole logits."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        h, _, _ = self._bottom(ids, mask)
        meta = {"train": False, "num_items": items or None}
        if score is not None:
            meta.update(score_positions=list(score[0]), score_tokens=list(score[1]))
        labels = batch["labels"] if items else torch.full_like(ids, -100)
        keep = needed_positions(mask, labels)
        reply = self._call("activations", 0, 0, {"hidden": h, "attention_mask": mask, "labels": labels, "cut.keep": keep}, **meta)
        return (float(reply.meta["loss"]) if items else 0.0), reply.tensors.get("scores")

    def server_state(self) -> dict[str, torch.Tensor]:
        """What the server trained for this client (its blocks of the server-side adapter)."""
        if not self.split:
            return {}
        return dict(self._call("state", 0, 0, {}).tensors)

    def global_state(self, step: int = 0) -> dict[str, torch.Tensor]:
        """The last average (personal segments included) and the updates folded into base weights (``wire.names.FOLD``);
        with ``step``, the average that ends the round before it (the server waits for it)."""
        return dict(self._call("global", step, 0, {}).tensors)

    def checkpoint(self, step: int) -> None:
        """Ask the server to save its part of the run at ``step`` (all clients of the run ask together)."""
        self.link.keep_server_state(self._call("checkpoint", step, 0, {}).tensors)

    # -- stage 7 and the sequential relay -------------------------------------------------------------
    def aggregate(self, step: int) -> None:
        """Send this client's adapters to be averaged, weighted by its training samples; take the average back."""
        session = self.party.session
        if session.secure_aggregation:  # the adapters leave this client only masked (parties/secure.py)
            reply = client_round(self._call, session.client, session.clients, step, self.party.state(), session.samples)
        else:
            reply = self._call("aggregate", step, 0, self.party.state(), weight=session.samples)
        values, factors = split(FOLD, reply.tensors)
        folds: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in factors.items():  # MODULE::B and MODULE::A
            module, _, factor = name.rpartition("::")
            folds.setdefault(module, {})[factor] = tensor
        self.party.load_state(values)
        for module, factors in folds.items():
            self.party.fold(module, fold_delta(factors["B"], factors["A"]))

    def hand_on(self, step: int) -> None:
        """Sequential: end this client's turn by handing its client-side model and optimizer to the next."""
        moments, meta = self.party.optimizer_state()
        tensors = {**self.party.state(), **tag(OPT, moments)}
        self._call("relay_put", step, 0, tensors, optimizer=meta)

    def take_over(self, step: int) -> None:
        """Sequential: start a turn (at ``step``; 0 after training) from the model the last client handed on."""
        reply = self._call("relay_get", step, 0, {})
        state, moments = split(OPT, reply.tensors)
        self.party.load_state(state)
        self.party.load_optimizer_state(moments, reply.meta["optimizer"])
