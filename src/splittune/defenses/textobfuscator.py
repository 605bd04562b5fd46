"""TextObfuscator: each token's embedding moved toward its cluster's prototype, plus noise within the cluster.

Zhou et al., "TextObfuscator: Making Pre-trained Language Model a Privacy Protector via Obfuscating Word
Representations" (Findings of ACL 2023): tokens are clustered into prototypes, and the client sends representations
that a cluster's tokens share (pulled to the prototype, perturbed by random noise), so an inverter can at best name
the cluster, while the task, trained on the obfuscated representations, keeps working.

Where this departs from the paper, plainly:

- the clusters are a seeded k-means (Lloyd's: ``clusters`` distinct random rows to start, 25 rounds) of the
  public embedding outputs of every token, computed once per table and process (cached), not of contextual token
  representations from the client's model over a corpus. A token's cluster is its embedding's nearest prototype
  (for an unchanged float32 embedding, its k-means cluster), so the defense needs no token ids and an attacker
  replays it on the public bottom as the client runs it;
- it acts on the embeddings while the bottom runs (the shape of ``dx``), as a fixed interpolation
  e' = e + pull·(p − e) plus Gaussian noise of expected norm ``noise`` × the cluster's radius (the mean distance of
  its members to p); the paper's training losses that pull representations to their prototype and push prototypes
  apart are not used (``pull`` does that pull directly);
- an attacker who knows the settings can rebuild the same clusters (the table and the seed are public); the noise
  comes from the client's secret, keyed by step and micro-batch as every defense's noise here.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import Field

from ..dpmath.mechanisms import nearest_rows
from .base import Defense, Guarantee, Settings, register
from .noise import DrawsNoise, NoiseStream

ROUNDS = 25
_CLUSTERS: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # (table digest, k, seed)


class TextObfuscatorDefense(Settings):
    """TextObfuscator (Zhou et al. 2023): each token's embedding pulled toward its k-means prototype over the public
    embedding table, plus random noise within its cluster's radius."""

    name: Literal["textobfuscator"]
    clusters: int = Field(256, ge=1, description="prototypes the embedding table is clustered into (at most the vocabulary)")
    pull: float = Field(1.0, ge=0.0, le=1.0, description="how far each embedding moves to its prototype (0: stays, 1: becomes it)")
    noise: float = Field(1.0, ge=0.0, description="expected noise norm, in units of the cluster's radius (0: no noise)")
    seed: int = Field(0, description="seeds the k-means start (public: an attacker can rebuild the clusters)")


def clusters(table: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prototypes [k, d], each row's cluster [V] and each cluster's radius [k] (mean member distance to its prototype)
    of a seeded k-means over ``table``'s rows; computed once per table, k and seed."""
    t = table.detach().float().cpu()
    key = (hashlib.blake2b(t.numpy().tobytes(), digest_size=16).hexdigest(), k, seed)
    if key not in _CLUSTERS:
        k = min(k, t.shape[0])
        protos = t[torch.randperm(t.shape[0], generator=torch.Generator().manual_seed(seed))[:k]].clone()
        for _ in range(ROUNDS):
            assign = nearest_rows(t, protos)
            sums = torch.zeros_like(protos).index_add_(0, assign, t)
            counts = torch.bincount(assign, minlength=k).float()
            filled = counts > 0
            protos[filled] = sums[filled] / counts[filled, None]  # an empty cluster keeps its prototype
        assign = nearest_rows(t, protos)
        dist = torch.linalg.vector_norm(t - protos[assign], dim=-1)
        radius = torch.zeros(k).index_add_(0, assign, dist) / torch.bincount(assign, minlength=k).clamp_min(1).float()
        _CLUSTERS[key] = (protos, assign, radius)
    return _CLUSTERS[key]


def obfuscate(embeds: torch.Tensor, found: tuple[torch.Tensor, torch.Tensor, torch.Tensor], pull: float, noise: float,
              generator: torch.Generator) -> torch.Tensor:
    """``embeds`` [..., d] pulled to their nearest prototypes, plus noise of expected norm noise × the cluster's radius."""
    protos, _, radius = found
    c = nearest_rows(embeds.detach(), protos.to(embeds.device))
    target = protos[c].to(embeds.device, torch.float32)
    out = embeds.float() + pull * (target - embeds.float())
    if noise > 0:
        d = embeds.shape[-1]
        z = torch.randn(tuple(embeds.shape), generator=generator) / d ** 0.5  # E‖z‖ ≈ 1
        out = out + (noise * radius[c][..., None] * z).to(embeds.device)
    return out.to(embeds.dtype)


@register
class TextObfuscator(DrawsNoise, Defense):
    """The embedding output obfuscated while the bottom runs (the U-shaped top runs from dummy ids, untouched)."""

    name = "textobfuscator"
    Settings = TextObfuscatorDefense

    def __init__(self, settings: TextObfuscatorDefense, table: torch.Tensor, secret: int):
        self.pull, self.noise_scale = float(settings.pull), float(settings.noise)
        self.found = clusters(table, settings.clusters, settings.seed) if self.active else None
        self.noise = NoiseStream(secret, "textobfuscator")

    @classmethod
    def create(cls, settings, at):
        """Clustered in the space the embedding module outputs (a model may scale its table there)."""
        embedding = at.party.model.get_input_embeddings()
        with torch.no_grad():
            table = embedding(torch.arange(embedding.weight.shape[0], device=embedding.weight.device))
        return cls(settings, table, at.secret)

    @property
    def active(self):
        return self.pull > 0 or self.noise_scale > 0

    def embeddings(self, embeds, step, micro):
        return obfuscate(embeds, self.found, self.pull, self.noise_scale, self.noise.draw(step, micro))

    def varies_bottom(self):
        return "the textobfuscator defense draws new noise on the embeddings at every forward" if self.noise_scale > 0 else None

    @classmethod
    def guarantee(cls, entry, usage):
        return Guarantee({"clusters": entry["clusters"], "pull": entry["pull"], "noise": entry["noise"]}, has_epsilon=False)

    @classmethod
    def sweep(cls, run, scale):
        """Half-way to the prototype with little noise, all the way, and all the way with twice the noise."""
        return [(f"textobfuscator-{label}", {"defense": [{"name": "textobfuscator", "pull": p, "noise": n}]})
                for label, p, n in (("0.5", 0.5, 0.5), ("1", 1.0, 1.0), ("2", 1.0, 2.0))]
