"""The public geometry of a vocabulary that the token-level defenses share (``privtune``, ``santext``, ``custext``):
nearest neighbours and exponential-mechanism sampling tables over the pretrained input-embedding matrix.

Everything here is a fixed function of the public embedding matrix (no private data, no randomness), so the
mechanisms built on it are the same for the client and for an attacker who replays them. Rows are computed for a
token the first time it is needed and cached, and a row holds at most ``k`` entries, so a vocabulary of 50k tokens
costs memory proportional to the tokens seen times ``k``, never V². Distances are Euclidean, computed in chunks of
rows against the whole matrix (one chunk is ``chunk`` × V floats). The matrix is read as loaded: a bottom that trains
its embeddings (``segments.bottom: full``) moves away from it; the tables keep the weights they were computed from.
"""

from __future__ import annotations

import hashlib

import torch

from ..dpmath.mechanisms import nearest_rows
from .noise import DrawsNoise, NoiseStream


def distances(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The L2 distance [len(ids), V] from each of the tokens ``ids`` to every row of ``table`` (float32, ≥ 0)."""
    t = table.detach().float()
    x = t[ids.to(t.device)]
    sq = (t * t).sum(1)
    d2 = (x * x).sum(1, keepdim=True) + sq[None, :] - 2 * x @ t.T
    d2[torch.arange(len(ids)), ids.to(t.device)] = 0.0  # a token is at distance 0 from itself, exactly
    return d2.clamp_min(0).sqrt().cpu()


class Rows:
    """Per-token rows computed on first use and cached: ``fill(ids)`` makes sure each of ``ids`` has its row."""

    chunk = 256

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.vocab = int(table.shape[0])
        self.known = torch.zeros(self.vocab, dtype=torch.bool)

    def fill(self, ids: torch.Tensor) -> None:
        todo = torch.unique(ids.flatten().cpu())
        todo = todo[~self.known[todo]]
        for start in range(0, len(todo), self.chunk):
            part = todo[start:start + self.chunk]
            self.build(part, distances(self.table, part))
            self.known[part] = True

    def build(self, ids: torch.Tensor, dist: torch.Tensor) -> None:
        raise NotImplementedError


class Neighbours(Rows):
    """The ``k`` nearest other tokens of each token (the kNN graph PrivTune walks), nearest first."""

    def __init__(self, table: torch.Tensor, k: int):
        super().__init__(table)
        self.k = min(int(k), self.vocab - 1)
        self.ids = torch.zeros(self.vocab, self.k, dtype=torch.long)

    def build(self, ids, dist):
        dist[torch.arange(len(ids)), ids] = float("inf")  # not its own neighbour
        self.ids[ids] = dist.topk(self.k, dim=1, largest=False).indices

    def hops(self, token: int, n: int) -> torch.Tensor:
        """The tokens exactly ``n`` hops from ``token`` in the kNN graph (reached in n steps and in no fewer): its
        indirect neighbours; the nearest set that is not empty when the graph ends sooner (a tiny vocabulary)."""
        seen, frontier = {token}, [token]
        last = torch.tensor([token])
        for _ in range(max(int(n), 1)):
            self.fill(torch.tensor(frontier))
            step = {int(t) for f in frontier for t in self.ids[f].tolist()} - seen
            if not step:
                break
            seen |= step
            frontier = sorted(step)
            last = torch.tensor(frontier)
        return last


class ExponentialRows(Rows):
    """SanText's distribution P(y | x) ∝ exp(−ε·d(x, y)/2) over the whole vocabulary, held exactly in bounded memory:
    each token's ``k`` most likely outputs with their probabilities and the log-normaliser over all V; a draw that
    falls in the remaining (tail) mass is made exactly by Gumbel-max over the tokens outside the top ``k``."""

    def __init__(self, table: torch.Tensor, epsilon: float, k: int):
        super().__init__(table)
        self.epsilon, self.k = float(epsilon), min(int(k), self.vocab)
        self.top = torch.zeros(self.vocab, self.k, dtype=torch.long)
        self.logp = torch.zeros(self.vocab, self.k, dtype=torch.float64)

    def scores(self, dist: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.epsilon * dist.double()

    def build(self, ids, dist):
        s = self.scores(dist)
        log_z = torch.logsumexp(s, dim=1, keepdim=True)
        best = s.topk(self.k, dim=1)
        self.top[ids], self.logp[ids] = best.indices, best.values - log_z

    def log_probs(self, token: int) -> torch.Tensor:
        """The whole distribution log P(· | token) over the vocabulary (for tests and for attackers)."""
        s = self.scores(distances(self.table, torch.tensor([token])))[0]
        return s - torch.logsumexp(s, 0)

    def sample(self, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One output token per input token, drawn from ``generator``."""
        flat = ids.flatten().cpu()
        self.fill(flat)
        logp = self.logp[flat]
        head = logp.exp()
        tail = (1 - head.sum(1)).clamp_min(0)
        u = torch.rand(len(flat), generator=generator, dtype=torch.float64)
        pick = torch.multinomial(head.float().clamp_min(0) + 1e-30, 1, generator=generator)[:, 0]
        out = self.top[flat].gather(1, pick[:, None])[:, 0]
        for i in (u < tail).nonzero().flatten().tolist():
            out[i] = self._tail(int(flat[i]), generator)
        return out.view(ids.shape).to(ids.device)

    def _tail(self, token: int, generator: torch.Generator) -> int:
        s = self.scores(distances(self.table, torch.tensor([token])))[0]
        s[self.top[token]] = -float("inf")
        gumbel = -torch.log(-torch.log(torch.rand(len(s), generator=generator, dtype=torch.float64).clamp_min(1e-300)))
        return int((s + gumbel).argmax())


class Groups:
    """CusText's customised output sets: the vocabulary partitioned into groups of ``k`` tokens, each the smallest
    token id not yet grouped (a public order) with its ``k − 1`` nearest ungrouped tokens; a token's outputs are its
    group. Inside a group, P(y | x) ∝ exp(ε·u(x, y)/2) with u(x, y) = 1 − d(x, y)/max_y' d(x, y') ∈ [0, 1] (a score of
    sensitivity 1), so any two tokens of a group are ε-indistinguishable. Built once for the whole vocabulary (about
    20 s for a 49k × 576 matrix on a CPU: the distances of 64 candidate anchors per product), V × k entries kept; the
    grouping is cached per embedding matrix, so several clients of one process build it once."""

    def __init__(self, table: torch.Tensor, epsilon: float, k: int):
        t = table.detach().float()
        vocab = int(t.shape[0])
        self.k = max(min(int(k), vocab), 1)
        groups = _grouping(t, self.k)
        members = torch.full((len(groups), self.k), -1, dtype=torch.long)
        for g, m in enumerate(groups):
            members[g, :len(m)] = m
        logp = torch.empty(len(groups), self.k, self.k, dtype=torch.float64)  # [G, k (input), k (output)]
        for start in range(0, len(groups), 256):  # a few groups' rows at a time: bounded memory
            part = members[start:start + 256]
            e = t.cpu()[part.clamp_min(0)].double()
            real = (part >= 0)[:, None, :]
            dist = torch.cdist(e, e).masked_fill(~real, 0.0)
            far = dist.max(2, keepdim=True).values.clamp_min(1e-30)
            score = (0.5 * float(epsilon) * (1 - dist / far)).masked_fill(~real, -float("inf"))
            logp[start:start + 256] = score - torch.logsumexp(score, 2, keepdim=True)
        self.group = torch.zeros(vocab, dtype=torch.long)
        self.row = torch.zeros(vocab, dtype=torch.long)
        for g, m in enumerate(groups):
            self.group[m] = g
            self.row[m] = torch.arange(len(m))
        self.members, self._logp = members, logp

    @property
    def logp(self) -> torch.Tensor:
        """log P(output | token) [V, k] over the token's group (``members[group[token]]``); −inf pads a short group."""
        return self._logp[self.group, self.row]

    def sample(self, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flat = ids.flatten().cpu()
        g, r = self.group[flat], self.row[flat]
        pick = torch.multinomial(self._logp[g, r].exp().float(), 1, generator=generator)[:, 0]
        return self.members[g].gather(1, pick[:, None])[:, 0].view(ids.shape).to(ids.device)


_GROUPINGS: dict[tuple, list[torch.Tensor]] = {}


def _grouping(t: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The greedy partition of ``Groups`` (each group: its anchor, then nearest first), cached by the matrix's bytes."""
    key = (tuple(t.shape), k, hashlib.blake2b(t.cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest())
    if key not in _GROUPINGS:
        if len(_GROUPINGS) >= 2:
            _GROUPINGS.pop(next(iter(_GROUPINGS)))
        _GROUPINGS[key] = _greedy(t, k)
    return _GROUPINGS[key]


def _greedy(t: torch.Tensor, k: int, batch: int = 64) -> list[torch.Tensor]:
    """Exactly the one-anchor-at-a-time greedy, with the distances of the next ``batch`` candidate anchors (the
    smallest ungrouped ids) computed in one product: each is the next anchor if no group before it took it, since
    every smaller id is grouped by then. The ungrouped rows are compacted as they halve."""
    ids = torch.arange(t.shape[0], device=t.device)  # the ungrouped tokens' ids, in id order
    rows, sq = t, (t * t).sum(1)
    groups, taken = [], torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
    while not bool(taken.all()):
        if int(taken.sum()) * 2 > len(ids):  # compact: drop the grouped rows
            keep = ~taken
            ids, rows, sq, taken = ids[keep], rows[keep], sq[keep], taken[keep]
        candidates = (~taken).nonzero().flatten()[:batch]
        d2 = sq[:, None] - 2 * rows @ rows[candidates].T  # [rows, candidates], up to each candidate's own |x|²
        for j, first in enumerate(candidates.tolist()):
            if bool(taken[first]):
                continue
            column = d2[:, j].masked_fill(taken, float("inf"))
            column[first] = -float("inf")  # the anchor first
            pick = column.topk(min(k, int((~taken).sum())), largest=False).indices
            taken[pick] = True
            groups.append(ids[pick].cpu())
    return groups


class Substitution(DrawsNoise):
    """The shared body of a token-substitution defense (``santext``, ``custext``; mixed into a registered ``Defense``):
    each input token the bottom embeds is replaced by a draw from ``sampler`` (built lazily on first use: the
    tables are a function of the public embedding matrix only); the labels keep the true tokens, since only the
    ids the embedding layer reads are changed. ``epsilon: inf`` is off."""

    label = ""

    def __init__(self, epsilon: float, table: torch.Tensor, secret: int, make):
        self.epsilon, self.table, self.make, self.sampler = float(epsilon), table, make, None
        self._substituted = False  # ``tokens`` ran for the forward now embedding
        self.noise = NoiseStream(secret, self.label)

    @classmethod
    def create(cls, settings, at):
        """On one client: the tables come from its own (public, pretrained) input embeddings."""
        return cls(settings, at.party.model.get_input_embeddings().weight, at.secret)

    @property
    def active(self):
        return self.epsilon != float("inf")

    def tokens(self, ids, step, micro):
        if self.sampler is None:
            self.sampler = self.make(self.table)
        self._substituted = True
        return self.sampler.sample(ids, self.noise.draw(step, micro))

    def embeddings(self, embeds, step, micro):
        """After ``tokens`` (the client's bottom): nothing more. Called alone (a host that hooks only the embedding
        output, e.g. an attacker's replay on a public bottom): the rows are table rows, so their ids are found and
        substituted here, to the same effect."""
        if self._substituted:
            self._substituted = False
            return embeds
        ids = nearest_rows(embeds.detach(), self.table.detach()).to(self.table.device)
        new = self.tokens(ids, step, micro)
        self._substituted = False
        return self.table[new].to(embeds.device, embeds.dtype)

    def varies_bottom(self):
        return f"the {self.label} defense draws new substitutes for the tokens at every forward"
