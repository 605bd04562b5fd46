"""Learned inversion of smashed activations: SIP, the first stage of BiSR (Chen et al., CCS'24, arXiv 2409.00960;
research/privacy.md §2.1).

The server holds the pretrained base model (an open-weight model) and public text from another source. It pushes
that text through the *pretrained* bottom (blocks [0, cut)) and through the codec the run agreed for the uplink,
trains an inverter to map each position's activation back to its token (unshifted per-position cross-entropy), and
applies it to every training activation it received: argmax per position. The client's bottom adapters drift from
the pretrained weights as training goes on; the inverter never sees them, so the judge's ``per_step`` shows what
that drift buys the client.

Inverters: ``gru`` (SIP's default: GRU(d -> hidden) -> dropout -> output layer) and ``linear`` (the baseline:
the output layer on the activation alone). Public knowledge closes the gap between auxiliary and private text:

- ``head: embedding`` (default): the output layer is the pretrained input-embedding table itself (frozen, cosine
  logits with a learned scale) behind a linear map into embedding space that starts at its least-squares solution
  on the auxiliary activations; the GRU adds a context correction to it (initialised at zero). Every vocabulary
  token stays decodable though the auxiliary text never shows most of them. ``head: free`` is SIP's plain
  Linear(-> vocab).
- ``random_rows``: rows of uniformly random token ids join the auxiliary text (the attacker can push any token
  through the public bottom), so the inverter sees tokens the auxiliary text lacks.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from pydantic import Field

from ..knowledge import PublicKnowledge
from ...taps.tap import Tap
from .adaptive import replayed_bottom
from .base import Attack, AttackError, Options, Progress, Recovered, Recovery, observed, register, rows_of, wire_transform



class InversionOptions(Options):
    model: Literal["gru", "linear"] = Field("gru", description="inverter: SIP's GRU, or a linear map (the baseline)")
    head: Literal["embedding", "free"] = Field("embedding", description="output layer: the pretrained embedding table "
                                               "(frozen, behind a least-squares-initialised map) or a free Linear(-> vocab)")
    hidden: int = Field(256, ge=1, description="GRU width")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the output layer (GRU)")
    epochs: int = Field(2, ge=0, description="passes over the auxiliary activations")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(1e-5, ge=0, description="Adam weight decay")
    batch_size: int = Field(8, ge=1, description="rows per inverter training batch")
    aux_rows: int = Field(256, ge=1, description="rows of auxiliary text, of the run's sequence length")
    random_rows: int = Field(64, ge=0, description="rows of random token ids added to the auxiliary text")
    steps: list[int] | None = Field(None, description="training steps to attack (default: all recorded)")
    seed: int = Field(0, description="seeds the auxiliary sample, the inverter's initialisation and its batches")
    adaptive: bool = Field(True, description="train on auxiliary activations through the client's announced defenses (its "
                           "noise drawn afresh): an attacker who knows the defense trains against it")


def activation_records(tap: Tap, steps: list[int] | None = None) -> list:
    """The bottom cut's training activations the server received, with their ``hidden`` tensor."""
    records = [r for r in observed(tap, "activations", "up", train=True, steps=steps) if "hidden" in r.entries]
    if not records:
        raise AttackError(f"the tap in {tap.folder} holds no training activations from the client's bottom"
                          + (f" at steps {steps}" if steps else ""))
    return records


def record_batch(record) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A record's activations (float32), the attention mask of the rows they carry, and those rows."""
    hidden = record.tensor("hidden").float()
    rows = rows_of(record) or list(range(hidden.shape[0]))
    mask = record.tensor("attention_mask") if "attention_mask" in record.entries else torch.ones(hidden.shape[:2], dtype=torch.long)
    if mask.shape[0] != hidden.shape[0]:
        mask = mask[torch.tensor(rows, dtype=torch.long)]
    return hidden, mask, rows




class Inverter(nn.Module):
    """Per-position token logits from cut activations [B, T, d] (inputs standardised with the auxiliary statistics)."""

    def __init__(self, kind: str, width: int, vocab: int, hidden: int, dropout: float, table: torch.Tensor | None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        out = vocab if table is None else table.shape[1]
        self.rnn = nn.GRU(width, hidden, batch_first=True) if kind == "gru" else None
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden, out) if self.rnn is not None else None
        self.skip = nn.Linear(width, out) if self.rnn is None or table is not None else None
        self.register_buffer("table", None if table is None else F.normalize(table.float(), dim=-1))
        if table is not None:
            self.log_scale = nn.Parameter(torch.tensor(math.log(30.0)))
            if self.proj is not None:  # the GRU starts as no correction to the least-squares map
                nn.init.zeros_(self.proj.weight)
                nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = (hidden - self.mean) / self.std
        z = self.skip(x) if self.skip is not None else 0
        if self.rnn is not None:
            z = z + self.proj(self.drop(self.rnn(x)[0]))
        if self.table is None:
            return z
        return self.log_scale.exp() * F.normalize(z, dim=-1) @ self.table.T

    @torch.no_grad()
    def fit_skip(self, hidden: torch.Tensor, ids: torch.Tensor) -> None:
        """The linear map into embedding space by least squares: activation -> the token's (unit) embedding."""
        x = torch.cat([(hidden - self.mean) / self.std, torch.ones(hidden.shape[0], 1)], 1)
        solution = torch.linalg.lstsq(x.double(), self.table[ids].double(), driver="gelsd").solution.float()
        self.skip.weight.copy_(solution[:-1].T)
        self.skip.bias.copy_(solution[-1])


@register
class Inversion(Attack):
    name = "inversion"
    observer = "server"
    shapes = ("two-part", "u-shape")
    target = "inputs"
    summary = "SIP: an inverter trained on public text through the pretrained bottom maps smashed activations to tokens"
    Options = InversionOptions
    learns = True

    def fit(self, tap: Tap, public: PublicKnowledge, progress: Progress, seq_len: int, micro: int) -> Inverter:
        """The inverter trained on auxiliary (and random) rows through the pretrained bottom and the uplink codec."""
        o = self.options
        cut = int(tap.proposal()["cuts"][0])
        bottom = public.segment(0, cut)
        transform = wire_transform(tap, "up", defenses=o.adaptive, seed=o.seed)
        ids, mask = public.aux_rows(seq_len, o.aux_rows, seed=o.seed)
        g = torch.Generator().manual_seed(o.seed)
        if o.random_rows:
            ids = torch.cat([ids, torch.randint(0, public.vocab, (o.random_rows, seq_len), generator=g)])
            mask = torch.cat([mask, torch.ones(o.random_rows, seq_len, dtype=mask.dtype)])
        # in micro-batches of the run's size, as the codec saw them; the in-bottom defenses replayed (adaptive)
        with torch.no_grad(), replayed_bottom(bottom, tap.proposal(), o.seed, o.adaptive) as replay:
            hidden = torch.cat([transform(bottom(mask[i:i + micro], input_ids=ids[i:i + micro]).float())
                                for i in range(0, len(ids), micro)])
        keep = mask.bool()
        table = bottom.model.get_input_embeddings().weight.detach() if o.head == "embedding" else None
        torch.manual_seed(o.seed)
        inverter = Inverter(o.model, hidden.shape[-1], public.vocab, o.hidden, o.dropout, table)
        flat = hidden[keep]
        inverter.mean.copy_(flat.mean(0))
        inverter.std.copy_(flat.std(0).clamp_min(1e-4))
        if table is not None:
            inverter.fit_skip(flat, ids[keep])
        optimizer = torch.optim.Adam(inverter.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        batches = math.ceil(len(ids) / o.batch_size)
        total, losses = o.epochs * batches, []
        inverter.train()
        for epoch in range(o.epochs):
            order = torch.randperm(len(ids), generator=g)
            running = 0.0
            for b in range(batches):
                pick = order[b * o.batch_size:(b + 1) * o.batch_size]
                logits = inverter(hidden[pick])
                loss = F.cross_entropy(logits[keep[pick]], ids[pick][keep[pick]])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                running += loss.item()
                progress(epoch * batches + b + 1, total, f"{self.name}: training the inverter")
            losses.append(running / batches)
        inverter.eval()
        self.info = {"cut": cut, "codec": transform.codec, "defenses": transform.defenses + replay.replayed,
                     "not_replayed": replay.skipped, "aux": public.aux, "aux_rows": int(len(ids) - o.random_rows),
                     "random_rows": o.random_rows, "model": o.model, "head": o.head, "epoch_losses": losses}
        return inverter

    @torch.no_grad()
    def logits(self, inverter: Inverter, record) -> torch.Tensor:
        """The inverter's per-position logits [rows, T, vocab] for one recorded activation message (BiSR chains the
        optimization attack from these)."""
        hidden, _, _ = record_batch(record)
        return inverter(hidden)

    def trained(self, tap: Tap, public: PublicKnowledge, progress: Progress) -> Inverter:
        first = activation_records(tap)[0]
        hidden, _, _ = record_batch(first)
        return self.fit(tap, public, progress, seq_len=hidden.shape[1], micro=hidden.shape[0])

    def recover(self, tap: Tap, public: PublicKnowledge, progress: Progress) -> Recovery:
        records = activation_records(tap, self.options.steps)
        inverter = self.trained(tap, public, progress)
        recovery = Recovery(self.name, self.target, info=self.info)
        for record in records:
            _, mask, rows = record_batch(record)
            tokens = self.logits(inverter, record).argmax(-1)
            recovery.items.append(Recovered(record.session, record.step, record.micro, rows,
                                            tokens=torch.where(mask.bool(), tokens, -1)))
        return recovery
