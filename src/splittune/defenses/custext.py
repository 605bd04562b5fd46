"""CusText: each input token replaced, on the client, by an exponential-mechanism draw from its customised output set."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from .base import Defense, Guarantee, Settings, register
from .vocabulary import Groups, Substitution


class CusTextDefense(Settings):
    """CusText (Chen et al., ACL Findings 2023): the vocabulary is partitioned into sets of ``top`` nearby tokens; every
    input token is replaced by a member of its set drawn with probability ∝ exp(ε·u/2), u ∈ [0, 1] its similarity,
    so any two tokens of a set are ε-indistinguishable; the labels stay the true tokens."""

    name: Literal["custext"]
    epsilon: float = Field(..., gt=0.0, description="ε between any two tokens of one output set; inf: off")
    top: int = Field(20, ge=2, le=256, description="K: the size of each token's customised output set")


@register
class CusText(Substitution, Defense):
    """CusText (Chen, Li, Zhao, Gao, Wang: "A Customized Text Sanitization Mechanism with Differential Privacy",
    Findings of ACL 2023): each token's output set is customised (its K nearest tokens, shared by every member so the
    sets partition the vocabulary), and the exponential mechanism draws the replacement inside it with a normalised
    similarity score of sensitivity 1: ε-DP among the members of a set.

    Departures from the paper: (1) the tokens are the model's (sub-word) vocabulary, the similarity is from its
    pretrained input embeddings (u = 1 − distance / the set's largest distance from the token), and the sets are
    formed in token-id order (a public order) rather than by word frequency. (2) It runs inside the bottom's forward,
    drawing afresh at every forward from the client's secret. (3) CusText+ (skipping stop words) is not built."""

    name = "custext"
    label = "custext"
    Settings = CusTextDefense

    def __init__(self, settings: CusTextDefense, table, secret: int):
        super().__init__(settings.epsilon, table, secret, lambda t: Groups(t, settings.epsilon, settings.top))

    @classmethod
    def guarantee(cls, entry, usage):
        """ε-LDP per token among the members of its output set (tokens of different sets are told apart: CusText's
        threat model), composing linearly over the releases of a token."""
        eps = entry["epsilon"]
        if math.isinf(eps):
            return Guarantee({"epsilon_per_token": None}, None)
        return Guarantee({"epsilon_per_token": eps, "epsilon_per_token_all_releases": eps * (usage.releases + usage.eval_passes),
                          "set_size": entry["top"], "among": "the tokens of one output set"}, eps)

    @classmethod
    def sweep(cls, run, scale):
        """Sets of 20 tokens at ε 8, 3 and 1."""
        return [(f"custext-{e:g}", {"defense": [{"name": "custext", "epsilon": e}]}) for e in (8.0, 3.0, 1.0)]
