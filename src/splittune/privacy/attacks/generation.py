"""What the server reads of generation through the split: the prompt *and* the response (PIDI, "Patched Model
Inversion with Dual-Sided Initialization", Gu, Ye & Liu, ICML'26, arXiv 2606.14210, the VFLAIR-LLM follow-up).

While a client generates, its bottom sends the server the prompt's activations (one prefill message), then the
hidden state of every token it generated but the last (one message each: transformers feeds each new token
back). The server's tap holds them as ``generate`` records, and what it answered: in the two-part split the
head's logits (so it knows each next token's distribution), in the U-shape its trunk's output at the top cut.
Concatenated, the uplink is the bottom's output for the whole sequence (causal attention: a KV-cached position
equals the full forward's), so:

1. **dual-sided initialisation**: per position, the log-probabilities of the learned inverter on the bottom's
   activation (``inversion``, trained on public text through the pretrained bottom and the client's announced
   defenses: adaptive) plus ``prior_weight`` × the next-token log-probabilities the model itself gave at the
   position before (the tail side: the logits the server computed, or the pretrained top run on the trunk output
   it sent). The response's last token never crosses upward; the tail side alone recovers it.
2. **patched inversion**: relaxed tokens over windows of ``patch`` positions, earlier positions held at their
   decoded tokens, Adam matching the pretrained bottom's output to the observed one (the ``optimization``
   attack's objective), so a long generation is inverted in short pieces.

Departures from the paper (its code was not public when this was written; this follows its abstract): the
inverter is SIP's GRU with the embedding-table head, not the paper's; the tail side is the model's own
next-token distribution, which is exact for greedy decoding in the two-part split and the pretrained top's guess
in the U-shape (the client's fine-tuned top stays close to it); the patches are fixed windows, not learned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch.nn import functional as F

from ..knowledge import PublicKnowledge
from ...taps.tap import Tap
from .base import Attack, AttackError, Options, Progress, Recovered, Recovery, register, split_shape
from .inversion import Inversion


class GenerationOptions(Options):
    prior_weight: float = Field(1.0, ge=0, description="weight of the tail side (the model's next-token log-probabilities) "
                                "next to the inverter's; 0: the bottom side alone")
    iterations: int = Field(30, ge=0, description="Adam steps of the patched inversion per patch (0: initialisation only)")
    patch: int = Field(32, ge=1, description="positions per patch of the patched inversion")
    lr: float = Field(0.05, gt=0, description="Adam learning rate on the patch's token logits")
    temperature: float = Field(0.1, gt=0, description="tau of the relaxation softmax(Z / tau) @ E")
    inversion: dict[str, Any] = Field(default_factory=dict, description="options of the inverter (the inversion attack's; "
                                      "adaptive by default)")


@dataclass
class Sequence:
    """One generation call as the server saw it: the uplink messages (prefill, then one per fed-back token) and the
    replies, of one session, in order."""

    session: str
    index: int
    ups: list = field(default_factory=list)
    downs: list = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return int(self.ups[0].tensor("hidden").shape[1])

    def hidden(self) -> torch.Tensor:
        return torch.cat([r.tensor("hidden").float() for r in self.ups], dim=1)

    def mask(self) -> torch.Tensor:
        hidden = self.hidden()
        if not all("attention_mask" in r.entries for r in self.ups):
            return torch.ones(hidden.shape[:2], dtype=torch.long)
        return torch.cat([r.tensor("attention_mask") for r in self.ups], dim=1)


def sequences(tap: Tap) -> list[Sequence]:
    """The tap's generation calls: a ``generate`` message starting at position 0 opens one, the next ones of its
    session extend it; each reply joins the call of its session's last message."""
    found: list[Sequence] = []
    current: dict[str, Sequence] = {}
    counts: dict[str, int] = {}
    for record in tap.records("generate"):
        if record.dropped:
            continue
        if record.direction == "up":
            if "hidden" not in record.entries:
                continue
            if int(record.meta.get("start", 0)) == 0:
                counts[record.session] = counts.get(record.session, -1) + 1
                current[record.session] = Sequence(record.session, counts[record.session])
                found.append(current[record.session])
            elif record.session not in current:
                continue  # the tap began mid-sequence
            current[record.session].ups.append(record)
        elif record.session in current:
            current[record.session].downs.append(record)
    if not found:
        raise AttackError(f"the tap in {tap.folder} holds no generation (record it with `splittune generate --record-tap DIR` "
                          "or `splittune serve --record-tap DIR` while a client generates)")
    return found


@register
class GenerationInversion(Attack):
    name = "generation-inversion"
    observer = "server"
    shapes = ("two-part", "u-shape")
    target = "generation"
    summary = "PIDI: prompts and generated responses from the server's view of split generation (bottom and tail sides)"
    Options = GenerationOptions
    learns = True

    def __init__(self, options: dict[str, Any] | None = None):
        super().__init__(options)
        self.inversion = Inversion(self.options.inversion)  # its options checked now

    def tail(self, seq: Sequence, public: PublicKnowledge, cuts: list[int], mask: torch.Tensor) -> torch.Tensor | None:
        """[rows, T + 1, V] log-probabilities of each position's token from the model's prediction at the position
        before (row t + 1 predicted at t; position 0 has none: zeros): the tail side."""
        width = seq.hidden().shape[1]
        rows = mask.shape[0]
        out = torch.zeros(rows, width + 1, public.vocab)
        if len(cuts) == 1:  # two-part: the server computed the logits; each reply's last position predicts the next
            at = 0
            for up, down in zip(seq.ups, seq.downs):
                at += int(up.tensor("hidden").shape[1])
                if "logits" in down.entries:
                    out[:, at] = torch.log_softmax(down.tensor("logits")[:, -1].float()[:, :public.vocab], -1)
            return out
        downs = [d.tensor("hidden").float() for d in seq.downs if "hidden" in d.entries]
        if len(downs) != len(seq.ups):
            return None
        top = public.segment(int(cuts[-1]), public.spec.n_blocks)
        with torch.no_grad():
            logits = top(mask, hidden=torch.cat(downs, dim=1)).float()[..., :public.vocab]
        out[:, 1:] = torch.log_softmax(logits, -1)
        return out

    def patched(self, bottom, table: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, logp: torch.Tensor,
                progress: Progress, done: int, total: int) -> tuple[torch.Tensor, list[float]]:
        """Tokens [rows, T] after the patched inversion: each window's relaxed tokens moved so the pretrained bottom
        reproduces the observed activations there, the positions before it held at their decoded tokens."""
        o = self.options
        tokens = logp[:, :hidden.shape[1]].argmax(-1)
        embed = bottom.model.get_input_embeddings()
        relaxed: dict[str, torch.Tensor] = {}
        handle = embed.register_forward_hook(lambda module, args, out: relaxed["x"])
        losses = []
        try:
            for a in range(0, hidden.shape[1], o.patch):
                b = min(a + o.patch, hidden.shape[1])
                keep = mask[:, a:b].bool()
                if not keep.any():
                    continue
                z = (o.temperature * logp[:, a:b]).clone().requires_grad_(True)
                optimizer = torch.optim.Adam([z], lr=o.lr)
                fixed = table[tokens[:, :a]]
                dummy = torch.zeros(mask.shape[0], b, dtype=torch.long)
                loss = torch.zeros(())
                for i in range(o.iterations):
                    relaxed["x"] = torch.cat([fixed, torch.softmax(z / o.temperature, -1) @ table], dim=1)
                    got = bottom(mask[:, :b], input_ids=dummy)[:, a:b]
                    loss = 1 - F.cosine_similarity(got[keep], hidden[:, a:b][keep], dim=-1).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    done += 1
                    progress(done, total, f"{self.name}: patched inversion")
                tokens[:, a:b] = z.detach().argmax(-1)
                losses.append(float(loss))
        finally:
            handle.remove()
        return tokens, losses

    def recover(self, tap: Tap, public: PublicKnowledge, progress: Progress) -> Recovery:
        o = self.options
        found = sequences(tap)
        proposal = tap.proposal(found[0].session)
        cuts = [int(c) for c in proposal.get("cuts", [])]
        longest = max(s.hidden().shape[1] for s in found)
        inverter = self.inversion.fit(tap, public, progress, seq_len=max(longest + 1, 8), micro=found[0].ups[0].tensor("hidden").shape[0])
        bottom = public.segment(0, cuts[0])
        with torch.no_grad():
            table = bottom.model.get_input_embeddings()(torch.arange(public.vocab)).float()
        info: dict[str, Any] = {"cuts": cuts, "shape": split_shape(tap), "inversion": self.inversion.info,
                                "defenses": self.inversion.info.get("defenses", []), "sequences": [], "prior_weight": o.prior_weight}
        recovery = Recovery(self.name, self.target, info=info)
        total = o.iterations * sum(-(-s.hidden().shape[1] // o.patch) for s in found)
        done = 0
        for seq in found:
            hidden, mask = seq.hidden(), seq.mask()
            width = hidden.shape[1]
            with torch.no_grad():
                bottom_side = torch.log_softmax(inverter(hidden), -1)[..., :public.vocab]
            tail = self.tail(seq, public, cuts, mask) if o.prior_weight > 0 else None
            logp = torch.cat([bottom_side, torch.zeros(mask.shape[0], 1, public.vocab)], dim=1)  # + the last token
            if tail is not None:
                logp = logp + o.prior_weight * tail
            tokens, losses = self.patched(bottom, table, hidden, mask, logp, progress, done, total) if o.iterations \
                else (logp[:, :width].argmax(-1), [])
            done += o.iterations * -(-width // o.patch)
            last = logp[:, width].argmax(-1) if tail is not None else torch.full((mask.shape[0],), -1)
            full = torch.cat([torch.where(mask.bool(), tokens, -1), last[:, None]], dim=1)
            recovery.items.append(Recovered(seq.session, seq.index, 0, list(range(mask.shape[0])), tokens=full))
            info["sequences"].append({"session": seq.session, "index": seq.index, "prompt_len": seq.prompt_len,
                                      "positions": width + 1, "fed_back": len(seq.ups) - 1, "patch_losses": losses,
                                      "tail": tail is not None})
        return recovery
