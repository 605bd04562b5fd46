"""NoPeek: a distance-correlation term between the client's embeddings and the activations it sends, on its loss."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..dpmath.mechanisms import distance_correlation
from .base import Defense, DefenseError, Guarantee, Settings, register


class NoPeekDefense(Settings):
    """NoPeek (Vepakomma et al. 2020): the client's loss adds alpha × the distance correlation between its inputs
    (token embeddings) and the smashed activations it sends, so training makes them less alike."""

    name: Literal["nopeek"]
    alpha: float = Field(..., ge=0.0, description="weight of the distance-correlation term")


@register
class NoPeek(Defense):
    name = "nopeek"
    Settings = NoPeekDefense

    def __init__(self, alpha: float):
        self.alpha = float(alpha)

    @classmethod
    def create(cls, settings, at):
        if not at.party.trains(at.party.plan.segment("bottom")):
            raise DefenseError("defense nopeek regularises the client's bottom, and this bottom trains nothing (cut 0, or "
                               "segments.bottom: frozen); give the bottom blocks to train (a first cut ≥ 1 with LoRA, or full)")
        return cls(settings.alpha)

    @property
    def active(self):
        return self.alpha > 0

    def penalty(self, embeds, hidden, mask, share):
        """alpha × dCor(embeddings, activations) over the micro-batch's rows (padding zeroed), weighted by ``share``."""
        if self.alpha == 0 or not hidden.requires_grad:
            return None
        if hidden.shape[0] < 3:  # two points are always perfectly distance-correlated: no gradient at all
            raise DefenseError(f"defense nopeek correlates the rows of a micro-batch and needs at least 3 of them, got "
                               f"{hidden.shape[0]} (raise train.batch_size, or lower train.micro_batches)")
        keep = mask[..., None].to(hidden.dtype)
        return self.alpha * share * distance_correlation((embeds * keep).flatten(1), (hidden * keep).flatten(1))

    def figures(self, penalty):
        """The step's mean distance correlation between embeddings and activations."""
        return {"nopeek_dcor": round(penalty / self.alpha, 6)} if self.alpha > 0 else {}

    @classmethod
    def guarantee(cls, entry, usage):
        dcor = [m["nopeek_dcor"] for m in usage.metrics if "nopeek_dcor" in m]
        return Guarantee({"alpha": entry["alpha"], "dcor_first": dcor[0] if dcor else None,
                          "dcor_last": dcor[-1] if dcor else None}, has_epsilon=False)

    @classmethod
    def sweep(cls, run, scale):
        """Two weights, when the bottom trains and a micro-batch has the 3 rows a correlation needs."""
        t = run.train
        if run.segments.bottom == "frozen" or (run.cuts or [0])[0] == 0 or t.batch_size // t.micro_batches < 3:
            return []
        return [(f"nopeek-{a:g}", {"defense": [{"name": "nopeek", "alpha": a}]}) for a in (0.5, 2.0)]
