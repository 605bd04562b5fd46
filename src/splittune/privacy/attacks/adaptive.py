"""The adaptive attacker: it knows the client's announced defenses and replays them on its own public bottom, with
its own noise, so what it learns from is distributed like what the server receives (a defense judged against a
naive attacker is not judged; Tramèr et al., NeurIPS'20, "On Adaptive Attacks to Adversarial Example Defenses").

Two places a defense can act, two replays:

- on what crosses (the chain's defense slot: ``gaussian`` …): ``base.wire_transform(..., defenses=True)``;
- inside the client's bottom, on its token embeddings (``dx`` and any registered defense with an ``embeddings``
  hook): :func:`replayed_bottom` builds each announced one from the registry, as the client does, on a stand-in
  party holding the *public* bottom, and hooks the public bottom's embedding output through them.

What cannot be replayed is said, never silently skipped: a defense that acts only on the client's training (a loss
term such as ``nopeek``, DP-SGD on its adapters) changes weights the attacker does not have; a defense whose
``create`` needs more of the party than the public bottom offers is listed with its error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from ...defenses import DEFENSES, Defense, Placement

TRAINING_ONLY = ("acts on the client's training (its loss, gradients or adapters), not on what its bottom computes "
                 "from the text: nothing to replay")


@dataclass
class Replay:
    """What an adaptive attack replayed inside the public bottom, and what it could not (name: why)."""

    replayed: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def announced(proposal: dict[str, Any]) -> list[dict[str, Any]]:
    """The defenses the client announced in its session proposal (their parameters, never their secret)."""
    return [d for d in proposal.get("defenses", []) if isinstance(d, dict) and "name" in d]


def inside_bottom(proposal: dict[str, Any], seed: int, bottom) -> tuple[list, Replay]:
    """The announced defenses that act inside the bottom, built on the public ``bottom`` with secret ``seed``."""
    replay, live = Replay(), []
    stand_in = SimpleNamespace(model=bottom.model, spec=bottom.spec, device=torch.device("cpu"))
    for entry in announced(proposal):
        cls = DEFENSES.get(entry["name"])
        if cls is None:
            replay.skipped[entry["name"]] = "not a defense this splittune knows"
            continue
        if cls.crosses:
            continue  # the chain's defense slot: wire_transform replays it
        if cls.embeddings is Defense.embeddings:
            replay.skipped[entry["name"]] = TRAINING_ONLY
            continue
        try:
            made = cls.create(cls.Settings.model_validate(entry), Placement(stand_in, seed))
        except Exception as err:  # noqa: BLE001  (a defense that needs more than the public bottom: said, not hidden)
            replay.skipped[entry["name"]] = f"cannot be rebuilt on the public bottom: {err}"
            continue
        if not made.active:
            replay.skipped[entry["name"]] = TRAINING_ONLY
            made.close()
            continue
        live.append(made)
        replay.replayed.append(dict(entry))
    return live, replay


@contextlib.contextmanager
def replayed_bottom(bottom, proposal: dict[str, Any], seed: int, enabled: bool = True) -> Iterator[Replay]:
    """While open, the public ``bottom``'s embedding output goes through the client's announced in-bottom defenses,
    each forward with fresh noise (an evaluation-like draw); ``enabled=False``: the naive attacker."""
    if not enabled:
        yield Replay()
        return
    live, replay = inside_bottom(proposal, seed, bottom)
    if not live:
        yield replay
        return

    def hook(module, args, output):
        for d in live:
            output = d.embeddings(output, 0, 0)
        return output

    handle = bottom.model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield replay
    finally:
        handle.remove()
        for d in live:
            d.close()
