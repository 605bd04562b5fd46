"""The defenses that act inside the client's own computation rather than on a crossing: dχ-privacy noise on its
token embeddings, and NoPeek's distance-correlation term on its bottom's loss.

Both hook the client's embedding module only while the bottom runs (the U-shaped top runs the same model from
dummy ids, which must stay untouched). The noise is drawn like the chain's defenses (``cut/defenses.py``): from
the client's secret and the training step and micro-batch (evaluations: a count the client's checkpoint keeps).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ...errors import SplittuneError
from ...cut.defenses import NoiseStream
from ...dpmath.mechanisms import distance_correlation, dx_release
from ..party import Party

PARTY_DEFENSES = ("dx", "nopeek")


class DefenseError(SplittuneError, ValueError):
    """A defense that does not fit this client's split (names the defense and what it needs)."""


class ClientDefenses:
    def __init__(self, entries: list[dict[str, Any]], party: Party, secret: int):
        by_name = {e["name"]: e for e in entries}
        self.dx = by_name.get("dx")
        self.alpha = float(by_name["nopeek"]["alpha"]) if "nopeek" in by_name else 0.0
        self.noise = NoiseStream(secret, "dx")
        self.embedding = party.model.get_input_embeddings()
        if "nopeek" in by_name and not party.trains(party.plan.segment("bottom")):
            raise DefenseError("defense nopeek regularises the client's bottom, and this bottom trains nothing (cut 0, or "
                               "segments.bottom: frozen); give the bottom blocks to train (a first cut ≥ 1 with LoRA, or full)")

    def varies(self) -> str | None:
        """Why the bottom's activations differ every time (the activation cache's question), or None."""
        return "the dx defense draws new noise on the embeddings at every forward" if self.dx is not None else None

    @property
    def active(self) -> bool:
        return self.dx is not None or self.alpha > 0

    @contextlib.contextmanager
    def bottom(self, step: int = 0, micro: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Around one bottom forward (of training ``step`` and ``micro``-batch; step 0: an evaluation): the embedding
        output noised (dχ) and kept in the yielded box (NoPeek)."""
        box: dict[str, torch.Tensor] = {}

        def hook(module, args, output):
            if self.dx is not None:
                output = self._noised(output, step, micro)
            box["embeds"] = output
            return output

        handle = self.embedding.register_forward_hook(hook)
        try:
            yield box
        finally:
            handle.remove()

    def _noised(self, embeds: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        table = self.embedding.weight if self.dx.get("snap") else None
        return dx_release(embeds, float(self.dx["epsilon"]), table, self.noise.draw(step, micro))

    def penalty(self, box: dict[str, torch.Tensor], hidden: torch.Tensor, mask: torch.Tensor, share: float) -> torch.Tensor | None:
        """NoPeek's term for one training micro-batch: alpha × dCor(embeddings, activations) over its rows (padding
        zeroed), weighted by the micro-batch's ``share`` of the step's rows; None when there is none to add."""
        if self.alpha == 0 or not hidden.requires_grad or "embeds" not in box:
            return None
        if hidden.shape[0] < 3:  # two points are always perfectly distance-correlated: no gradient at all
            raise DefenseError(f"defense nopeek correlates the rows of a micro-batch and needs at least 3 of them, got "
                               f"{hidden.shape[0]} (raise train.batch_size, or lower train.micro_batches)")
        keep = mask[..., None].to(hidden.dtype)
        return self.alpha * share * distance_correlation((box["embeds"] * keep).flatten(1), (hidden * keep).flatten(1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.noise.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.noise.load_state_dict(state)
