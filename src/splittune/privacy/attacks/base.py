"""The attack seam: a small static interface and a first-match registry (the shape of peft's ``LoraVariant``).

An attack is a class with a ``name``, the ``observer`` whose tap it reads, the split ``shapes`` it fits, an
``Options`` model (pydantic, unknown keys refused) and one method, ``recover(tap, public, progress)``. It
returns a :class:`Recovery`: what it claims each observed row held, in one of four forms (``target``):

- ``inputs``: a token id per position of the row (-1 where it claims nothing);
- ``labels``: a label per position, i.e. the token that *follows* each position (-1: none claimed);
- ``class``: one score per row for the positive class (``Recovery.positive`` names it);
- ``bag``: the set of token ids one client trained on in an aggregation round;
- ``generation``: a token id per position of one generation call, the prompt then the response (the judge scores
  the two parts apart, against the client's own record of what it generated).

:func:`run_attack` is the only way to run one: it takes a recorded :class:`~..tap.Tap` and
:class:`~..knowledge.PublicKnowledge` and refuses anything else (DESIGN.md contract 6). The judge
(``privacy/judge.py``) scores a recovery against what the client really sent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ...errors import SplittuneError
from ...defenses import Defense
from ...cut.transforms import Crossing, End, build_transform
from ...models.partition import DTYPES
from ...wire import Message
from ...wire.codecs import make_codec_with_feedback
from ..knowledge import PublicKnowledge, ThreatModelError
from ...taps.tap import Tap

TARGETS = ("inputs", "labels", "class", "bag", "generation")
Progress = Callable[[int, int, str], None]  # (done, total, what): training or optimising steps


class AttackError(SplittuneError, ValueError):
    """An attack that cannot run on this tap or with these options; the text names what is missing."""


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Recovered:
    """One observed micro-batch's recovery: ``rows`` are its rows in the client's micro-batch (all, unless the
    activation cache kept some from crossing)."""

    session: str
    step: int
    micro: int
    rows: list[int]
    tokens: torch.Tensor | None = None  # [rows, seq] (inputs, labels)
    scores: torch.Tensor | None = None  # [rows] (class)
    bag: list[int] | None = None  # (bag)


@dataclass
class Recovery:
    attack: str
    target: str
    items: list[Recovered] = field(default_factory=list)
    positive: int | None = None  # class: the token id (label word) the scores point to
    info: dict[str, Any] = field(default_factory=dict)  # what the attack did: losses, steps, the signal it used


def no_progress(done: int, total: int, what: str) -> None:
    pass


class Attack(ABC):
    name: ClassVar[str]
    observer: ClassVar[str] = "server"
    shapes: ClassVar[tuple[str, ...]] = ("two-part", "u-shape")
    target: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    learns: ClassVar[bool] = False  # trains on public data: it must then be adaptive (trained through the defenses)

    def __init__(self, options: dict[str, Any] | None = None):
        try:
            self.options = self.Options.model_validate(options or {})
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "options"
            allowed = ", ".join(self.Options.model_fields) or "none"
            if first["type"] == "extra_forbidden":
                raise AttackError(f"attack {self.name}: unknown option {key!r} (options: {allowed})") from None
            raise AttackError(f"attack {self.name}: option {key!r}: {first['msg']} (got {first.get('input')!r})") from None

    @property
    def adaptive(self) -> bool | None:
        """Whether what it learns from goes through the client's announced defenses (None: it learns nothing)."""
        inner = getattr(self, "inversion", None)  # an attack started from the learned inverter
        if inner is not None:
            return inner.adaptive
        return bool(self.options.adaptive) if "adaptive" in type(self.options).model_fields else None

    def check(self, tap: Tap) -> None:
        """Refuse a tap this attack cannot use, naming what it needs."""
        if tap.observer != self.observer:
            raise AttackError(f"attack {self.name} reads the {self.observer}'s tap; {tap.folder} is the {tap.observer}'s "
                              f"(record it with train --record-tap {self.observer})")
        shape = split_shape(tap)
        if shape not in self.shapes:
            raise AttackError(f"attack {self.name} needs a {' or '.join(self.shapes)} split; this run is {shape} "
                              f"(cuts {tap.proposal().get('cuts')})")

    @abstractmethod
    def recover(self, tap: Tap, public: PublicKnowledge, progress: Progress) -> Recovery:
        """What the observer can reconstruct from ``tap`` with ``public`` knowledge only."""


def split_shape(tap: Tap) -> str:
    proposal = tap.proposal()
    if proposal.get("mode") != "split":
        return str(proposal.get("mode"))
    return "two-part" if len(proposal.get("cuts", [])) == 1 else "u-shape"


REGISTRY: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    REGISTRY[cls.name] = cls
    return cls


def run_attack(attack: Attack, tap: Tap, public: PublicKnowledge, progress: Progress | None = None) -> Recovery:
    """``attack`` on ``tap`` with ``public`` knowledge, and nothing else."""
    if not isinstance(attack, Attack):
        raise ThreatModelError(f"run_attack runs an Attack, got {type(attack).__name__}")
    if type(tap) is not Tap:
        raise ThreatModelError(f"an attack reads a recorded tap (taps.tap.Tap), not a {type(tap).__name__}: "
                               "never a party, a run's data or its adapters")
    if type(public) is not PublicKnowledge:
        raise ThreatModelError(f"an attack's knowledge is PublicKnowledge (pretrained weights, public text), not a "
                               f"{type(public).__name__}")
    attack.check(tap)
    recorded = tap.proposal().get("fingerprint")
    if recorded and recorded != public.fingerprint:
        raise ThreatModelError(f"the tap was recorded on a model with fingerprint {recorded}, but the public model "
                               f"{public.model_ref} has fingerprint {public.fingerprint}: give the run's base model")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        recovery = attack.recover(tap, public, progress or no_progress)
    if recovery.target not in TARGETS:
        raise AttackError(f"attack {attack.name} returned target {recovery.target!r}; targets: {', '.join(TARGETS)}")
    return recovery


def observed(tap: Tap, kind: str, direction: str = "up", train: bool = True, steps: list[int] | None = None):
    """The recorded training messages of ``kind`` (in ``steps`` when given), in the order they crossed."""
    for record in tap.records(kind, direction):
        if record.dropped:
            continue
        if train and record.meta.get("train", True) is not True:
            continue
        if steps is not None and record.step not in steps:
            continue
        yield record


def rows_of(record) -> list[int]:
    """The client's micro-batch rows a message carries (the activation cache sends only the rows it misses)."""
    cache = record.meta.get("cache")
    mask = record.tensor("attention_mask") if "attention_mask" in record.entries else None
    if cache and cache.get("sent") is not None:
        return list(cache["sent"])
    return list(range(int(mask.shape[0]))) if mask is not None else []


def wire_transform(tap: Tap, direction: str, defenses: bool = False, seed: int = 0):
    """What the run's ``direction`` did to a ``hidden`` tensor: the cast to the run's dtype, then (``defenses``) the
    chain's defense slot as the tap's terms name it, with the attacker's own noise (it knows the mechanism and its
    parameters, never the client's secret), then the agreed codec round-tripped with the project's own encoder (bit
    for bit what the receiver decoded; stochastic rounding replayed with a fixed seed). Error feedback (topk)
    carries state across steps an attacker cannot replay; it is applied without."""
    dtype = DTYPES.get(str(tap.proposal().get("dtype", "float32")), torch.float32)
    terms = tap.chain().get(direction, [])
    spec = next((s["hidden"] for s in terms if s.get("name") == "codec" and "hidden" in s), "raw")
    codec, _ = make_codec_with_feedback(spec)
    generator = torch.Generator().manual_seed(seed)
    slot = [t for t in (build_transform(s) for s in terms) if isinstance(t, Defense) and t.crosses] if defenses else []
    for i, t in enumerate(slot):
        t.bind(seed, f"attacker.{i}.{t.name}")

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(dtype)
        for t in slot:  # an evaluation-like crossing: nothing is kept for a backward
            crossing = Crossing(Message("activations", "attack", 0, 0, {"hidden": x}, {}))
            t.send(crossing, End())
            x = crossing.msg.tensors["hidden"]
        if codec.lossy:
            x = codec.encode_with_decoded(x, generator)[2]
        return x.float()

    apply.defenses = [t.spec() for t in slot]
    apply.codec = codec.spec()
    return apply
