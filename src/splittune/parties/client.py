"""The client party: stage 1 (bottom forward), stage 4 (top forward and loss, U-shape), its half of
stage 5, and the driver of a step. It holds the data and, in the U-shaped split, the labels.

With no server (``mode: centralized``) the same class runs the whole model locally: the baseline
shares every line of data handling, optimisation and evaluation with the split run.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

from ..channels import Channel
from ..data.choices import candidate_scores
from ..device import to_device
from ..wire import Message
from ..schedules.aggregate import fold_delta
from .party import Party

Batch = dict[str, torch.Tensor]


def count_items(labels: torch.Tensor) -> int:
    """Tokens that carry loss: labels after the causal shift that are not ignored."""
    return int((labels[:, 1:] != -100).sum())


@dataclass
class StepResult:
    loss: float
    tokens: int
    lr: float


class Client:
    def __init__(self, party: Party, channel: Channel | None = None, session: str | None = None):
        self.party = party
        self.plan = party.plan
        self.channel = channel
        self.session = session or uuid.uuid4().hex[:12]
        self.server_info: dict = {}
        self.split = self.plan.shape != "centralized"  # a federated client trains the whole model and talks only to average
        if self.split and channel is None:
            raise ValueError(f"a {self.plan.shape} split needs a channel to the server")

    def connect(self, resume: int | None = None) -> dict:
        """Stage 0: propose the session; the server builds its part from it (restored to step ``resume``) or says why not."""
        if self.channel is not None:
            meta = self.party.session.to_meta()
            if resume is not None:
                meta["resume"] = resume
            reply = self.channel.call(Message("hello", self.session, meta=meta))
            self.server_info = dict(reply.meta)
        return self.server_info

    def _call(self, kind: str, step: int, micro: int, tensors: dict, **meta) -> Message:
        reply = self.channel.call(Message(kind, self.session, step, micro, tensors, meta))
        reply.tensors = to_device(reply.tensors, self.party.device)
        return reply

    # -- one micro-batch, forward and backward ----------------------------------------------------------
    def _micro(self, step: int, micro: int, batch: Batch, num_items: int) -> float:
        party, plan = self.party, self.plan
        batch = to_device(batch, party.device)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if plan.shape == "centralized":
            out = party.run(0, plan.n_blocks, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items)
            out.loss.backward()
            return float(out.loss.detach())
        bottom = plan.segment("bottom")
        h = party.run(0, bottom.end, input_ids=ids, attention_mask=mask).hidden
        want_grad = h.requires_grad
        if plan.shape == "two-part":
            reply = self._call("activations", step, micro, {"hidden": h.detach(), "attention_mask": mask, "labels": labels},
                               train=True, num_items=num_items, want_grad=want_grad)
            loss = float(reply.meta["loss"])
        else:
            reply = self._call("activations", step, micro, {"hidden": h.detach(), "attention_mask": mask}, train=True)
            top = plan.segment("top")
            h_top = reply.tensors["hidden"].requires_grad_(True)
            out = party.run(top.start, top.end, hidden=h_top, attention_mask=mask, labels=labels, num_items_in_batch=num_items)
            out.loss.backward()
            loss = float(out.loss.detach())
            reply = self._call("gradients", step, micro, {"grad": h_top.grad}, want_grad=want_grad)
        if want_grad:
            h.backward(reply.tensors["grad"])
        return loss

    def train_step(self, step: int, micro_batches: list[Batch]) -> StepResult:
        """Forward and backward every micro-batch, then one optimizer step on both parties.

        Each micro-batch's loss is its token sum divided by the tokens of the *whole* step, so the
        accumulated gradient is that of one big batch, whatever the micro-batch split.
        """
        loss, num_items = self.backward(step, micro_batches)
        lr = self.party.lr
        self.optimizer_step(step)
        return StepResult(loss, num_items, lr)

    def backward(self, step: int, micro_batches: list[Batch]) -> tuple[float, int]:
        """Stages 1–5 for every micro-batch: gradients accumulate on both parties."""
        num_items = sum(count_items(b["labels"]) for b in micro_batches)
        if num_items == 0:
            raise ValueError(f"step {step}: no label carries loss (every label is -100)")
        loss = sum(self._micro(step, i, b, num_items) for i, b in enumerate(micro_batches))
        return loss, num_items

    def optimizer_step(self, step: int) -> None:
        """Stage 6 on both parties, with the global gradient norm."""
        own = self.party.sq_grad_norm()
        server_sq = 0.0
        if self.split:
            reply = self._call("step", step, 0, {}, sq_norm=own)
            server_sq = float(reply.meta["sq_norm"])
        self.party.optimizer_step(own + server_sq)

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
            bottom, top = plan.segment("bottom"), plan.segment("top")
            h = party.run(0, bottom.end, input_ids=ids, attention_mask=mask).hidden
            reply = self._call("activations", 0, 0, {"hidden": h, "attention_mask": mask}, train=False)
            out = party.run(top.start, top.end, hidden=reply.tensors["hidden"], **ending)
        loss = float(out.loss) if out.loss is not None else 0.0
        return loss, None if score is None else candidate_scores(out.logits, *score)

    def _eval_on_server(self, batch: Batch, items: int, score) -> tuple[float, torch.Tensor | None]:
        """Two-part: the server ends the model; it returns the loss and candidate scores, never whole logits."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        h = self.party.run(0, self.plan.segment("bottom").end, input_ids=ids, attention_mask=mask).hidden
        meta = {"train": False, "num_items": items or None}
        if score is not None:
            meta.update(score_positions=list(score[0]), score_tokens=list(score[1]))
        labels = batch["labels"] if items else torch.full_like(ids, -100)
        reply = self._call("activations", 0, 0, {"hidden": h, "attention_mask": mask, "labels": labels}, **meta)
        return (float(reply.meta["loss"]) if items else 0.0), reply.tensors.get("scores")

    def server_state(self) -> dict[str, torch.Tensor]:
        """What the server trained for this client (its blocks of the server-side adapter)."""
        if not self.split:
            return {}
        return dict(self._call("state", 0, 0, {}).tensors)

    def global_state(self) -> dict[str, torch.Tensor]:
        """The last average (personal segments included) and the updates folded into base weights (``fold::``)."""
        return dict(self._call("state", 0, 0, {}, op="global").tensors)

    def checkpoint(self, step: int) -> None:
        """Ask the server to save its part of the run at ``step`` (all clients of the run ask together)."""
        self._call("state", step, 0, {}, op="checkpoint")

    # -- stage 7 and the sequential relay -------------------------------------------------------------
    def aggregate(self, step: int) -> None:
        """Send this client's adapters to be averaged, weighted by its training samples; take the average back."""
        reply = self._call("state", step, 0, self.party.state(), op="aggregate", weight=self.party.session.samples)
        values, folds = {}, {}
        for name, tensor in reply.tensors.items():
            if name.startswith("fold::"):
                _, module, factor = name.split("::")
                folds.setdefault(module, {})[factor] = tensor
            else:
                values[name] = tensor
        self.party.load_state(values)
        for module, factors in folds.items():
            self.party.fold(module, fold_delta(factors["B"], factors["A"]))

    def hand_on(self, step: int) -> None:
        """Sequential: end this client's turn by handing its client-side model and optimizer to the next."""
        moments, meta = self.party.optimizer_state()
        tensors = {**self.party.state(), **{f"opt::{k}": v for k, v in moments.items()}}
        self._call("state", step, 0, tensors, op="relay_put", optimizer=meta)

    def take_over(self, step: int) -> None:
        """Sequential: start a turn (at ``step``; 0 after training) from the model the last client handed on."""
        reply = self._call("state", step, 0, {}, op="relay_get")
        state = {k: v for k, v in reply.tensors.items() if not k.startswith("opt::")}
        moments = {k.removeprefix("opt::"): v for k, v in reply.tensors.items() if k.startswith("opt::")}
        self.party.load_state(state)
        self.party.load_optimizer_state(moments, reply.meta["optimizer"])
