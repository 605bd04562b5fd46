"""PrivTune: dχ noise on the client's token embeddings, its mean shifted toward each token's n-hop neighbours and its
magnitude scaled by the token's importance."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..dpmath.mechanisms import dx_noise, nearest_rows
from .base import Defense, Guarantee, Settings, register
from .noise import DrawsNoise, NoiseStream
from .vocabulary import Neighbours


class PrivTuneDefense(Settings):
    """PrivTune (Liu et al. 2025): each token's embedding moves toward the centroid of its n-hop neighbours in the
    public embedding space, plus dχ noise (density ∝ exp(−ε‖z‖/s)) scaled by s = 1 − importance·imp(token)."""

    name: Literal["privtune"]
    epsilon: float = Field(..., gt=0.0, description="dχ privacy per unit of embedding distance, for the most-noised tokens (inf: off)")
    shift: float = Field(0.5, ge=0.0, le=1.0, description="how far each token's noise mean moves toward its n-hop neighbours' "
                         "centroid (0: plain dχ, 1: onto the centroid)")
    hops: int = Field(2, ge=1, le=4, description="n: the neighbours the noise points to are exactly this many hops away")
    neighbours: int = Field(8, ge=1, le=64, description="k of the k-nearest-neighbour graph over the vocabulary")
    importance: float = Field(0.5, ge=0.0, lt=1.0, description="how much less noise the most important tokens get (noise "
                              "scale 1 − importance·imp, imp ∈ [0, 1] from the token's BPE rank; 0: the same noise for all)")


@register
class PrivTune(DrawsNoise, Defense):
    """PrivTune (Liu, Han, Cai et al.: "PrivTune: Efficient and Privacy-Preserving Fine-Tuning of Large Language Models
    via Device-Cloud Collaboration", arXiv 2512.08809, 2025): each token's representation gets dχ-privacy noise whose
    mean is moved toward the token's n-hop indirect neighbours (so it resembles them) and whose magnitude is scaled
    by the token's importance (less distortion where it matters).

    Departures from the paper: (1) the mean shift is closed-form, ``shift`` × (centroid of the tokens exactly n hops
    away in the k-nearest-neighbour graph of the public embedding matrix − the embedding), not the solution of the
    paper's optimisation problem. (2) Importance is a public signal, the token's rank in the vocabulary (BPE
    vocabularies add tokens in order of merge frequency, so a later id is a rarer, more informative token), not one
    computed from the private data or the model's attention. (3) It acts on the token embeddings inside the bottom
    (where the neighbour geometry and dχ's meaning are defined); the paper perturbs the bottom's output. The blocks
    after it are post-processing.

    The guarantee: token t is released as μ(t) + s(t)·Z, Z of density ∝ exp(−ε‖z‖), μ(t) its shifted embedding, a
    fixed public map. Two tokens of equal noise scale s are (ε/s)·‖μ(t) − μ(t')‖-indistinguishable (dχ on the shifted
    embeddings); the most important tokens get the least noise, so the headline ε is ε / (1 − importance), the
    weakest per-unit-distance guarantee. Tokens of different scales have no such bound (the densities' tails differ):
    with ``importance: 0`` every token has the same scale and the bound holds between every two tokens."""

    name = "privtune"
    Settings = PrivTuneDefense

    def __init__(self, settings: PrivTuneDefense, table: torch.Tensor, secret: int):
        self.epsilon, self.shift, self.hops = float(settings.epsilon), float(settings.shift), int(settings.hops)
        self.importance = float(settings.importance)
        self.table = table
        self.graph = Neighbours(table, settings.neighbours)
        self.targets: dict[int, torch.Tensor] = {}  # token -> its n-hop neighbours' centroid (cached, public)
        self._ids: torch.Tensor | None = None
        self.noise = NoiseStream(secret, "privtune")

    @classmethod
    def create(cls, settings, at):
        return cls(settings, at.party.model.get_input_embeddings().weight, at.secret)

    @property
    def active(self):
        return not math.isinf(self.epsilon)

    def scale(self, ids: torch.Tensor) -> torch.Tensor:
        """Each token's noise scale 1 − importance·rank/(V − 1): the latest (rarest) token gets the least noise."""
        imp = ids.float() / max(self.graph.vocab - 1, 1)
        return 1.0 - self.importance * imp

    def centroids(self, ids: torch.Tensor) -> torch.Tensor:
        """The centroid of each token's n-hop neighbours' embeddings [..., d] (float32, on the CPU)."""
        flat = ids.flatten().cpu()
        for t in torch.unique(flat).tolist():
            if t not in self.targets:
                self.targets[t] = self.table.detach()[self.graph.hops(t, self.hops).to(self.table.device)].float().mean(0).cpu()
        return torch.stack([self.targets[t] for t in flat.tolist()]).view(*ids.shape, -1)

    def inputs(self, ids):
        self._ids = ids  # the ids this forward embeds: the mean shift and the scale are the token's

    def embeddings(self, embeds, step, micro):
        ids, self._ids = self._ids, None
        if ids is None or tuple(ids.shape) != tuple(embeds.shape[:-1]):  # called alone: the rows are table rows
            ids = nearest_rows(embeds.detach(), self.table.detach()).to(embeds.device)
        mean = embeds
        if self.shift > 0:
            target = self.centroids(ids).to(embeds.device, embeds.dtype)
            mean = (1 - self.shift) * embeds + self.shift * target
        z = dx_noise(tuple(embeds.shape), self.epsilon, self.noise.draw(step, micro)) * self.scale(ids.cpu())[..., None]
        return mean + z.to(embeds.device, embeds.dtype)

    def varies_bottom(self):
        return "the privtune defense draws new noise on the embeddings at every forward"

    @classmethod
    def guarantee(cls, entry, usage):
        """dχ per token on the shifted embeddings: ε/(1 − importance) per unit distance for the least-noised tokens,
        composing linearly over releases."""
        eps = entry["epsilon"]
        if math.isinf(eps):
            return Guarantee({"epsilon_per_token": None}, None)
        worst = eps / (1 - entry["importance"])
        return Guarantee({"epsilon_per_token": worst, "epsilon_most_noised": eps,
                          "epsilon_per_token_all_releases": worst * (usage.releases + usage.eval_passes),
                          "metric": "distance between shifted embeddings; tokens of equal noise scale"}, worst)

    @classmethod
    def sweep(cls, run, scale):
        """Noise whose expected norm is ½, 1 and 2 embedding norms for the most-noised tokens, as ``dx`` sweeps."""
        return [(f"privtune-{k:g}x", {"defense": [{"name": "privtune", "epsilon": round(scale["width"] / (k * scale["embedding_norm"]), 4)}]})
                for k in (0.5, 1.0, 2.0)]
