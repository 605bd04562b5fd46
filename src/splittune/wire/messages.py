"""Messages: the typed records parties exchange (DESIGN.md vocabulary: message → frame on the wire)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Every kind a party may send; a frame with any other kind is rejected before it is used.
KINDS = (
    "hello",  # client → server: session proposal (model fingerprint, cuts, adapters); reply: "hello" accepted
    "activations",  # forward tensors crossing a cut, either direction
    "gradients",  # gradients crossing a cut, either direction
    "step",  # optimizer step: squared gradient norms exchanged for global clipping
    "state",  # what the server trained for this client (its server-side adapter), for saving and export
    "global",  # the last average (personal segments included) and the updates folded into base weights
    "aggregate",  # stage 7: a client's adapters in, its share of the average back
    "checkpoint",  # every client of a run asks the server to save its part at a step
    "relay_put",  # sequential: a client hands its client-side model and optimizer on
    "relay_get",  # sequential: a client takes over the model the last one handed on
    "secagg_keys",  # secure aggregation: a client's public keys for one average; reply: the roster
    "secagg_shares",  # secure aggregation: encrypted key shares for the peers; reply: this client's inbox
    "secagg_unmask",  # secure aggregation: the shares that remove the masks; reply: the share of the average
    "generate",  # split generation: the new positions' activations at the cut; reply: the segment's output
    "close",  # the client ends an inference session (its KV cache is freed)
    "error",  # a refusal with a reason
)


@dataclass
class Message:
    kind: str
    session: str = ""
    step: int = 0
    micro: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown message kind {self.kind!r}; kinds: {', '.join(KINDS)}")
