"""dχ-privacy (metric local DP) on the client's token embeddings, inside its bottom's forward."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..dpmath.mechanisms import dx_release
from .base import Defense, Guarantee, Settings, register
from .noise import DrawsNoise, NoiseStream


class DxDefense(Settings):
    """dχ-privacy (metric local DP, Feyisetan et al. 2020) on the client's token embeddings: each token's embedding
    gets noise of density ∝ exp(−ε‖z‖), so two tokens at distance d are ε·d-indistinguishable (docs/privacy.md)."""

    name: Literal["dx"]
    epsilon: float = Field(..., gt=0.0, description="privacy per unit of embedding distance (smaller: more noise)")
    snap: bool = Field(False, description="replace each noised embedding by its nearest token embedding (a token substitution)")


@register
class Dx(DrawsNoise, Defense):
    """The embedding output noised while the bottom runs (the U-shaped top runs the same model from dummy ids and
    stays untouched); its noise is drawn from the client's secret like the chain's defenses."""

    name = "dx"
    Settings = DxDefense

    def __init__(self, settings: DxDefense, table, secret: int):
        self.epsilon, self.snap, self.table = float(settings.epsilon), settings.snap, table
        self.noise = NoiseStream(secret, "dx")

    @classmethod
    def create(cls, settings, at):
        return cls(settings, at.party.model.get_input_embeddings().weight, at.secret)

    @property
    def active(self):
        return True

    def embeddings(self, embeds, step, micro):
        return dx_release(embeds, self.epsilon, self.table if self.snap else None, self.noise.draw(step, micro))

    def varies_bottom(self):
        return "the dx defense draws new noise on the embeddings at every forward"

    @classmethod
    def guarantee(cls, entry, usage):
        """Metric DP per token embedding (ε·distance), composing linearly over releases."""
        eps = entry["epsilon"]
        return Guarantee({"epsilon_per_token": eps, "epsilon_per_token_all_releases": eps * (usage.releases + usage.eval_passes)}, eps)

    @classmethod
    def sweep(cls, run, scale):
        """Noise whose expected norm is ½, 1 and 2 embedding norms (ε = width / (k · norm))."""
        return [(f"dx-{k:g}x", {"defense": [{"name": "dx", "epsilon": round(scale["width"] / (k * scale["embedding_norm"]), 4)}]})
                for k in (0.5, 1.0, 2.0)]
