"""Which tokens one client trained on, read from its adapter update by the aggregator: word leakage from a
FedAvg update (research/privacy.md §2.4: DAGER, Petrov et al., NeurIPS'24, arXiv 2405.15586; FL word leakage,
Melis et al., S&P'19) — what secure aggregation must hide.

The first block's attention projections see one token at a time: their input at a position is
``x_v = norm(E[v])`` for that position's token ``v`` alone. The gradient of a LoRA factor ``A`` of such a module is
``Bᵀ G Xᵀ``, so its rows lie in the span of the batch's ``x_v``. The aggregator holds each client's adapters as
sent at every average and the share it sent back (recomputed as FedAvg of the round's contributions when the tap
holds no down record), so a client's round update is ``ΔA = A_sent − A_share``. In the
first round the start is the initial adapters: LoRA's init scheme is public and splittune seeds it from the
session proposal's ``seed``, which the aggregator (it is the server) saw; :func:`initial_adapters` re-runs the
project's own ``apply_training`` on the pretrained first block and matches the first round's sent ``A`` bit for
bit (B starts at 0 and A gets no gradient at step 1).

The bag is chosen by a simultaneous orthogonal matching pursuit (DAGER's span test made greedy): pick the
vocabulary token whose normalised input explains most of the residual rows of ``ΔA`` (modules with the same
input stacked), project the rows off the span of the chosen inputs, and go on while the pick explains
``ratio`` times more than the median token (or exactly ``top_k`` picks).

Frankly, what limits it: AdamW's per-entry normalisation (its first step is ``lr·sign(g)``) bends ``ΔA`` out of
the inputs' span and a rank-``r`` factor shows only ``r`` mixtures per module, so recall is partial (the
pursuit's first picks are precise); momentum carries earlier rounds' tokens into a round's update; with one local
step per round the first round carries nothing in ``A`` (its gradient is 0 while ``B`` = 0), and ``ΔB`` lives in
``r`` dimensions, too few to tell tokens apart: that round's bag is empty. Higher rank, one local step per round
(``aggregate_every: 1``) and ``candidates: aux`` (tokens seen in public text) make it stronger. With a byte-level
tokenizer a public letter-frequency prior alone guesses much of a batch's bag: compare against it too.
"""

from __future__ import annotations

import collections
from typing import Literal

import torch
from pydantic import Field

from ...averaging import Contribution, average, lora_module
from ...models.arch import detect_arch
from ...models.segment import run_segment
from ...models.adapters import apply_training, lora_layers, trainable_state
from ...models.partition import Segment
from ...parties.party import SessionSpec
from ..knowledge import PretrainedSegment, PublicKnowledge
from ...dpmath.secagg import DEFAULT_FRAC_BITS
from ...taps.tap import Tap
from .base import Attack, AttackError, Options, Progress, Recovered, Recovery, observed, register


class AggregatorOptions(Options):
    ratio: float = Field(3.0, gt=1, description="stop when the best token explains less than ratio × the median token")
    top_k: int | None = Field(None, ge=1, description="recover exactly this many tokens per round (overrides ratio)")
    max_bag: int = Field(64, ge=1, description="most tokens recovered per round")
    candidates: Literal["vocab", "aux"] = Field("vocab", description="candidate tokens: the whole vocabulary, or "
                                                "those that occur in the public auxiliary text")
    steps: list[int] | None = Field(None, description="aggregation rounds (their steps) to attack; default all")


def as_values(t: torch.Tensor) -> torch.Tensor:
    """A recorded adapter tensor as numbers. Under secure aggregation the aggregator holds masked ring words (int64);
    read as the fixed point they claim to be (``dpmath/secagg.py``) they are uniform noise, which is the point."""
    return t.float() if t.is_floating_point() else (t.double() / 2.0**DEFAULT_FRAC_BITS).float()


def initial_adapters(public: PublicKnowledge, proposal: dict) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """The client's first-block LoRA factors before training (public init, the proposal's seed), and the model."""
    spec = SessionSpec.from_meta(proposal)
    seg = PretrainedSegment(public.source, 0, 1)  # a fresh copy: apply_training wraps it
    model = apply_training(seg.model, seg.spec, [(Segment("bottom", 0, 1, True, False), "lora")], spec.lora_config, spec.seed)
    return trainable_state(model), model


def _first_block(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    spec = detect_arch(base.config)
    run_segment(model, base.get_submodule(spec.blocks_path), 0, 1, attention_mask=torch.ones_like(input_ids),
                input_ids=input_ids, hidden=None, want_logits=False)


@torch.no_grad()
def token_inputs(model: torch.nn.Module, vocab: int) -> dict[str, torch.Tensor]:
    """Each LoRA module's input for every token ``[vocab, in]``, kept only where it depends on that token alone
    (checked: the input at position 1 of ``[a, b]`` and ``[c, b]`` must agree)."""
    seen: dict[str, torch.Tensor] = {}
    layers = lora_layers(model)
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: seen.__setitem__(n, args[0].detach().float()))
             for n, m in layers.items()]
    try:
        _first_block(model, torch.arange(vocab)[:, None])
        single = dict(seen)
        g = torch.Generator().manual_seed(0)
        pair = torch.randint(1, vocab, (4, 2), generator=g)
        pair[1::2, 1] = pair[0::2, 1]
        _first_block(model, pair)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, x in single.items():
        p = seen[name][:, 1]
        if torch.allclose(p[0::2], p[1::2], atol=1e-5):
            out[name] = x[:, 0]
    return out


def input_table(public: PublicKnowledge) -> tuple[str, torch.Tensor]:
    """The pretrained input embedding table and its name in a client's state (what a bottom trained in full sends)."""
    seg = public.segment(0, 0)
    weight = seg.model.get_input_embeddings().weight
    name = next(n for n, p in seg.model.named_parameters() if p is weight)
    return name, weight.detach().float()


def changed_rows(delta: torch.Tensor, start: torch.Tensor, before: torch.Tensor | None, tol: float = 1e-6,
                 rank: int = 32, outside: float = 0.65) -> list[int]:
    """The tokens whose embedding row a client's round update moved for their own sake.

    Sparse update (an embedding of its own): a row gets a gradient only when its token is in the batch, and Adam
    leaves a row whose gradient was always 0 where it was (weight decay, the same factor on every row, is fitted and
    removed), so the moved rows are the bag. Dense update (an embedding tied to the head, as SmolLM2's: the head's
    gradient reaches every row, and Adam's per-entry normalisation makes them all move): the rows of tokens that
    were not in the batch move alike, each a mixture of the same final hidden states, so they share a few
    directions; a batch token's row also carries its own input and label gradient. The bag is then the rows with
    more than ``outside`` of their update outside the top-``rank`` subspace of all rows (at most an eighth of the
    width, so that a random row is far outside it). A pick of most rows is no
    bag (masked words under secure aggregation look like that): empty. A row that moves exactly as in the client's
    previous round (cosine > 1 − 1e-4) is Adam's momentum repeating that round's step, not this round's token."""
    c = float(((delta * start).sum(1) / (start * start).sum(1).clamp_min(1e-30)).median())
    own = delta - c * start
    moved = own.norm(dim=1)
    bag = moved > tol * start.norm(dim=1).clamp_min(1e-12)
    if bag.float().mean() > 0.5:  # dense: the rows that leave the directions every row shares
        _, _, basis = torch.svd_lowrank(delta, q=max(min(rank, delta.shape[1] // 8), 1), niter=3)
        bag = (delta - (delta @ basis) @ basis.T).norm(dim=1) > outside * delta.norm(dim=1).clamp_min(1e-30)
    if bag.float().mean() > 0.5:  # a round's batches never hold most of a vocabulary: masked words or noise
        return []
    if before is not None:
        stale = torch.nn.functional.cosine_similarity(delta, before, dim=1) > 1 - 1e-4
        bag &= ~stale
    return bag.nonzero().flatten().tolist()


def pursuit(groups: list[tuple[torch.Tensor, torch.Tensor]], candidates: torch.Tensor, ratio: float,
            top_k: int | None, max_bag: int) -> list[int]:
    """Greedy simultaneous OMP: tokens whose inputs (``X`` rows, unit norm) span the update rows ``R`` of each group."""
    rows = [R / R.norm().clamp_min(1e-30) for R, _ in groups]
    resid = list(rows)
    chosen: list[int] = []
    limit = min(top_k or max_bag, int(candidates.sum()))
    while len(chosen) < limit:
        gain = sum((X @ r.T).pow(2).sum(1) for (_, X), r in zip(groups, resid))
        ok = candidates.clone()
        ok[chosen] = False
        best = int(torch.where(ok, gain, torch.full_like(gain, -1.0)).argmax())
        if top_k is None and gain[best] < ratio * gain[ok].median():
            break
        chosen.append(best)
        resid = []
        for (_, X), r in zip(groups, rows):
            Q = torch.linalg.qr(X[chosen].T.double()).Q.float()
            resid.append(r - (r @ Q) @ Q.T)
    return chosen


@register
class AggregatorInversion(Attack):
    name = "aggregator"
    observer = "aggregator"
    shapes = ("two-part", "u-shape", "federated")
    target = "bag"
    summary = "the tokens each client trained on in a round, from its first-block LoRA update (span pursuit)"
    Options = AggregatorOptions

    def check(self, tap: Tap) -> None:
        super().check(tap)
        if not any(not r.dropped for r in tap.records("aggregate", "up")):
            raise AttackError(f"the tap in {tap.folder} holds no adapters sent for averaging (several clients, an "
                              "averaging schedule: sfl-v1, sfl-v2 or federated)")

    def recover(self, tap: Tap, public: PublicKnowledge, progress: Progress) -> Recovery:
        opts = self.options
        ups = list(observed(tap, "aggregate", "up"))
        downs = {(r.session, r.step): r for r in observed(tap, "aggregate", "down")}
        rounds = sorted({r.step for r in ups})
        init, model = initial_adapters(public, tap.proposal())
        inputs = token_inputs(model, public.vocab)
        modules = [m for m in sorted(inputs) if f"{m}.lora_A.weight" in init]
        names = {k for k in init if lora_module(k) and lora_module(k)[0] in modules}
        table_name, table = input_table(public)
        if any(table_name in r.entries for r in ups):  # a bottom trained in full sends its embedding table
            names, init = names | {table_name}, {**init, table_name: table}
        elif not modules or not any(names & set(r.entries) for r in ups):
            raise AttackError("the clients send no LoRA factors of a first-block module whose input is one token "
                              f"(first block's LoRA modules: {sorted(lora_layers(model))}) and no embedding table; adapt "
                              "the bottom with LoRA, or train it in full")
        groups_of: dict[str, list[str]] = collections.defaultdict(list)  # modules with the same input, stacked
        for m in modules:
            key = next((k for k in groups_of if torch.equal(inputs[k], inputs[m])), m)
            groups_of[key].append(m)
        unit = {k: inputs[k] / inputs[k].norm(dim=1, keepdim=True).clamp_min(1e-6) for k in groups_of}
        candidates = unit[next(iter(unit))].norm(dim=1) > 0.5  # a zero (padding) embedding is never a candidate
        if opts.candidates == "aux":
            ids, mask = public.aux_rows(256, 512)
            seen = torch.zeros(public.vocab, dtype=torch.bool)
            seen[ids[mask.bool()]] = True
            candidates &= seen
        personal = "bottom" in tap.proposal().get("personal", [])
        start = {s: {k: v for k, v in init.items() if k in names} for s in {r.session for r in ups}}
        before: dict[str, torch.Tensor] = {}  # each client's previous table update (what Adam's momentum repeats)
        items, empty = [], 0
        for i, step in enumerate(rounds):
            sent = {r.session: {k: as_values(r.tensor(k)) for k in names if k in r.entries}
                    for r in ups if r.step == step}
            shares = self._shares(tap, step, [r for r in ups if r.step == step], sent, downs, personal)
            for session, tensors in sent.items():
                if opts.steps is None or step in opts.steps:
                    groups = []
                    for key, members in groups_of.items():
                        rows = [tensors[f"{m}.lora_A.weight"] - start[session][f"{m}.lora_A.weight"] for m in members
                                if f"{m}.lora_A.weight" in tensors]
                        if rows and torch.cat(rows).abs().max() > 0:
                            groups.append((torch.cat(rows), unit[key]))
                    if table_name in tensors:
                        delta = tensors[table_name] - start[session][table_name]
                        bag = changed_rows(delta, start[session][table_name], before.get(session))
                        before[session] = delta
                    else:
                        bag = pursuit(groups, candidates, opts.ratio, opts.top_k, opts.max_bag) if groups else []
                    empty += not bag
                    items.append(Recovered(session, step, 0, rows=[], bag=bag))
                start[session] = {**start[session], **shares.get(session, {})}
            progress(i + 1, len(rounds), "aggregation rounds")
        signal = "embedding rows that moved" if table_name in names else "first-block LoRA A update (span pursuit)"
        return Recovery(self.name, "bag", items, info={"rounds": len(rounds), "modules": modules, "empty_bags": empty,
                                                       "signal": signal})

    @staticmethod
    def _shares(tap, step, records, sent, downs, personal) -> dict[str, dict[str, torch.Tensor]]:
        """What each client starts its next round from: the share sent back (recorded, or recomputed as the
        aggregator computed it: FedAvg by the clients' weights); personal or folded modules as described."""
        if personal:
            return sent
        out: dict[str, dict[str, torch.Tensor]] = {}
        alpha = float(tap.proposal().get("lora", {}).get("alpha", 16.0))
        result = average([Contribution(float(r.meta.get("weight", 1.0)), sent[r.session], alpha) for r in records])
        for session, tensors in sent.items():
            down = downs.get((session, step))
            share = {}
            for name in tensors:
                if down is not None and name in down.entries:
                    share[name] = down.tensor(name).float()
                elif name in result.tensors:
                    share[name] = result.tensors[name].float()
                elif name.endswith("lora_B.weight"):  # folded into the base weight: LoRA restarts with B = 0
                    share[name] = torch.zeros_like(tensors[name])
                else:  # a folded module's A stays as the client had it
                    share[name] = tensors[name]
            out[session] = share
        return out
