"""What a defense is: one class with its config entry (``Settings``), where it acts, and the hooks it needs — the
shape of peft's ``LoraVariant``: a small static interface, one file per defense, found through one registry.

A defense acts either on what crosses the cut (``crosses = True``: a transform of the chain's defense slot, built on
both ends from the session's terms and run on the client's sending end) or inside the client (around its bottom's
forward, on its loss, on its gradients: the hooks below, which the client it is given to at construction calls
through ``ClientDefenses``). Every defense also says whether it fits a run (``check``), what it guarantees
(``guarantee``, for the run's summary) and what a privacy sweep tries (``sweep``); one that keeps state (a noise
count, a step count) checkpoints it.

Adding a defense is one file in this package holding its ``Settings`` and its ``@register``-ed class: the config's
entry, the chain, the client, the summary, ``splittune privacy`` and the config reference all find it here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from ..cut.transforms import register as register_transform
from ..errors import SplittuneError

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..parties.party import Party


class DefenseError(SplittuneError, ValueError):
    """A defense that does not fit this client's split (names the defense and what it needs)."""


class Settings(BaseModel):
    """A defense's config entry: its parameters, validated, unknown keys refused (the config's ``Section`` rules)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass
class Usage:
    """What a run did that a defense's guarantee depends on (``guarantee``)."""

    seq_len: int
    per_step: int  # examples in one optimizer step
    releases: int  # the most times one training example was released (the batches it was in)
    steps: int  # the most training steps one client took
    eval_passes: int  # the times the held-out examples were released
    metrics: list[dict[str, Any]]  # the run's step rows
    sample_rate: float = 1.0  # the largest examples-per-step over a client's examples


@dataclass
class Placement:
    """What a client-side defense is built with: the client's party, its private secret (never sent) and the size
    of its training (examples it holds, steps it takes, examples per step)."""

    party: "Party"
    secret: int | None  # None: a fresh random one (tools that never resume)
    examples: int = 0
    steps: int = 0
    per_step: int = 0


@dataclass
class Guarantee:
    """A defense's figures for the summary's ``privacy.<name>``, and its headline ε (``<name>_epsilon``; None: no
    guarantee, e.g. no noise) when it has one."""

    figures: dict[str, Any]
    epsilon: float | None = None
    has_epsilon: bool = True


def finite(x: float) -> float | None:
    return None if math.isinf(x) else x  # JSON has no infinity: null means "no guarantee" (no noise)


class Defense:
    """One defense. Class attributes say what it is; the hooks default to doing nothing."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[Settings]]
    key: ClassVar[str] = "defense"  # the run config key of its entry: an item of the ``defense`` list, or a key of its own
    crosses: ClassVar[bool] = False  # a transform of the chain's defense slot (else: it acts inside the client)

    # -- the run: does it fit, what does it guarantee, what does a sweep try --
    @classmethod
    def check(cls, settings: Settings, run: "RunConfig") -> None:
        """Raise ValueError naming what the run lacks when this defense cannot act in it (the config calls it)."""

    @classmethod
    def guarantee(cls, entry: dict[str, Any], usage: Usage) -> Guarantee | None:
        """The figures of ``entry`` (its settings, plus what ``resolved`` filled in) after a run's ``usage``."""
        return None

    @classmethod
    def sweep(cls, run: "RunConfig", scale: dict[str, float]) -> list[tuple[str, dict[str, Any]]]:
        """The settings ``splittune privacy`` tries by default, as (label, run-config overlay); ``scale``: the median
        activation-row and embedding norms and the width (public knowledge)."""
        return []

    # -- inside the client (``crosses = False``) --
    @classmethod
    def create(cls, settings: Settings, at: Placement) -> "Defense":
        """This defense on one client."""
        raise NotImplementedError(f"defense {cls.name!r} acts on what crosses the cut; the chain builds it from the terms")

    @property
    def active(self) -> bool:
        """Whether it hooks the bottom's forward (its embeddings or its loss)."""
        return False

    def tokens(self, ids: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """The token ids the bottom embeds, changed (a substitution; the labels keep the true tokens)."""
        return ids

    def inputs(self, ids: torch.Tensor) -> None:
        """The token ids entering the bottom's forward that runs now (for a term on the loss that needs them)."""

    def embeddings(self, embeds: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """The bottom's token embeddings of training ``step`` and ``micro``-batch (step 0: an evaluation), changed."""
        return embeds

    def penalty(self, embeds: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, share: float) -> torch.Tensor | None:
        """A term on the bottom's loss for one training micro-batch (weighted by its ``share`` of the step's rows)."""
        return None

    def figures(self, penalty: float) -> dict[str, float]:
        """The step's figures for its metrics row, from the sum of the terms it added this step."""
        return {}

    def varies_bottom(self) -> str | None:
        """Why the bottom's activations differ at every forward (the activation cache's question), or None."""
        return None

    def begin(self, samples: int) -> None:
        """A training step of ``samples`` examples starts."""

    def at(self, offset: int) -> None:
        """The micro-batch whose forward runs next starts at example ``offset`` of the step."""

    def before_optimizer(self) -> None:
        """The step's gradients are complete; the optimizer steps next."""

    def resolved(self) -> dict[str, Any]:
        """Settings decided at build time (a noise found for a target ε) that the guarantee needs."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def close(self) -> None:
        pass


DEFENSES: dict[str, type[Defense]] = {}


def register(cls: type[Defense]) -> type[Defense]:
    """Add ``cls`` to the registry (and, when it acts on crossings, to the chain's transforms)."""
    if cls.name in DEFENSES:
        raise ValueError(f"defense {cls.name!r} is registered twice")
    DEFENSES[cls.name] = cls
    if cls.crosses:
        register_transform(cls)
    return cls


def defense(name: str) -> type[Defense]:
    if name not in DEFENSES:
        raise DefenseError(f"no defense {name!r}; the defenses are {', '.join(sorted(DEFENSES))}")
    return DEFENSES[name]


def under(key: str) -> list[type[Defense]]:
    """The defenses whose entries sit under the run config's ``key``, in registry order."""
    return [cls for cls in DEFENSES.values() if cls.key == key]
