"""SanText: each input token replaced, on the client, by a token drawn with probability ∝ exp(−ε·distance/2)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from .base import Defense, Guarantee, Settings, register
from .vocabulary import ExponentialRows, Substitution


class SanTextDefense(Settings):
    """SanText (Yue et al., ACL Findings 2021): every input token the bottom embeds is replaced by y with probability
    ∝ exp(−ε·‖e(x) − e(y)‖/2) over the whole vocabulary (e: the public input embeddings), so two tokens at distance
    d are ε·d-indistinguishable; the labels stay the true tokens."""

    name: Literal["santext"]
    epsilon: float = Field(..., gt=0.0, description="privacy per unit of embedding distance (smaller: more substitution); inf: off")
    top: int = Field(64, ge=1, le=4096, description="outputs kept per token in the sampling table (memory only: the tail "
                     "beyond them is sampled exactly when drawn)")


@register
class SanText(Substitution, Defense):
    """SanText (Yue, Du, Wang, Li, Sun, Chow: "Differential Privacy for Text Analytics via Natural Text Sanitization",
    Findings of ACL 2021): the client sanitises its text token by token with the exponential mechanism over
    embedding distance, a metric local DP; the server only ever sees sanitised tokens' activations.

    Departures from the paper: (1) the tokens are the model's (sub-word) vocabulary and the distance is between its
    pretrained input embeddings, not words and GloVe vectors. (2) It runs inside the bottom's forward, on the ids
    the embedding layer reads, drawn afresh at every forward (training steps and evaluations) from the client's
    secret, rather than once over the dataset. (3) SanText+ (a frequency split into sensitive and kept words) is not
    built. The distribution is exact over the whole vocabulary (``vocabulary.ExponentialRows``): only the table of
    likely outputs is truncated, never the support."""

    name = "santext"
    label = "santext"
    Settings = SanTextDefense

    def __init__(self, settings: SanTextDefense, table, secret: int):
        super().__init__(settings.epsilon, table, secret, lambda t: ExponentialRows(t, settings.epsilon, settings.top))

    @classmethod
    def guarantee(cls, entry, usage):
        """Metric local DP per token (ε·distance), composing linearly over the releases of a token."""
        eps = entry["epsilon"]
        if math.isinf(eps):
            return Guarantee({"epsilon_per_token": None}, None)
        return Guarantee({"epsilon_per_token": eps, "epsilon_per_token_all_releases": eps * (usage.releases + usage.eval_passes),
                          "metric": "L2 distance between the tokens' input embeddings"}, eps)

    @classmethod
    def sweep(cls, run, scale):
        """ε·(embedding norm) at 40, 20 and 10: with distances near an embedding norm, a token of a 50k vocabulary keeps
        itself mostly, about as often as not, and rarely."""
        return [(f"santext-{k:g}", {"defense": [{"name": "santext", "epsilon": round(k / scale["embedding_norm"], 4)}]})
                for k in (40.0, 20.0, 10.0)]
