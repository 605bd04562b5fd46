"""A run's defenses, read from its config, and the client's end of them: ``ClientDefenses`` calls every hook of the
defenses a client was built with, in config order, so the client's pipeline names no defense."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .base import DEFENSES, Defense, Guarantee, Placement, Settings, Usage, defense

if TYPE_CHECKING:
    from ..config import RunConfig


def configured(cfg: "RunConfig") -> list[tuple[type[Defense], Settings]]:
    """Every defense the run config names, with its entry: the ``defense`` list in order, then the keys of their
    own (``dp_sgd``)."""
    out = [(defense(d.name), d) for d in cfg.defense]
    for cls in DEFENSES.values():
        settings = getattr(cfg, cls.key) if cls.key != "defense" else None
        if settings is not None:
            out.append((cls, settings))
    return out


def chain_entries(cfg: "RunConfig") -> tuple[dict[str, Any], ...]:
    """The entries that run in the chain's defense slot (on what crosses), as the session's terms carry them."""
    return tuple(s.model_dump() for cls, s in configured(cfg) if cls.crosses)


def guarantees(cfg: "RunConfig", usage: Usage, built: "ClientDefenses | None") -> dict[str, Any]:
    """The summary's privacy keys: ``privacy`` with every defense's figures, and ``<name>_epsilon`` for each that has
    an ε (``built``: a client's defenses, for settings decided when they were built)."""
    entries = configured(cfg)
    if not entries:
        return {}
    out: dict[str, Any] = {"privacy": {"defenses": [d.model_dump() for d in cfg.defense],
                                       "releases_per_example": usage.releases, "eval_passes": usage.eval_passes}}
    for cls, settings in entries:
        found = built.find(cls) if built is not None else None
        g: Guarantee | None = cls.guarantee({**settings.model_dump(), **(found.resolved() if found else {})}, usage)
        if g is not None:
            out["privacy"][cls.name] = g.figures
            if g.has_epsilon:
                out[f"{cls.name.replace('-', '_')}_epsilon"] = g.epsilon
    return out


class ClientDefenses:
    """The defenses that act inside one client (not in the chain), built for it from the run config."""

    def __init__(self, defenses: list[Defense], embedding: torch.nn.Module | None = None):
        self.defenses = defenses
        self.embedding = embedding
        self.paused = False  # a reference evaluation without them (``Client.undefended``)

    @classmethod
    def build(cls, cfg: "RunConfig", at: Placement, keys: tuple[str, ...] | None = None) -> "ClientDefenses":
        """The run's client-side defenses on the client ``at`` describes (``keys``: only the entries under these
        config keys; generation takes the ``defense`` list alone)."""
        if at.secret is None:  # tools that never resume: a fresh secret
            at = dataclasses.replace(at, secret=secrets.randbits(63))
        made = []
        try:
            for c, settings in configured(cfg):
                if not c.crosses and (keys is None or c.key in keys):
                    made.append(c.create(settings, at))
        except BaseException:
            for d in made:
                d.close()
            raise
        return cls(made, at.party.model.get_input_embeddings())

    def __bool__(self) -> bool:
        return bool(self.defenses)

    def find(self, kind: type[Defense]) -> Defense | None:
        return next((d for d in self.defenses if isinstance(d, kind)), None)

    def varies(self) -> str | None:
        """Why the bottom's activations differ at every forward (the activation cache's question), or None."""
        return next((why for d in self.defenses if (why := d.varies_bottom()) is not None), None)

    @property
    def active(self) -> bool:
        return not self.paused and any(d.active for d in self.defenses)

    def perturbs(self) -> bool:
        """Whether any of them changes what the client computes at evaluation (an embedding-noise defense)."""
        return any(d.active and d.varies_bottom() is not None for d in self.defenses)

    @contextlib.contextmanager
    def bottom(self, step: int = 0, micro: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Around one bottom forward (of training ``step`` and ``micro``-batch; step 0: an evaluation): the ids the
        embedding layer reads through every defense's ``tokens`` (a substitution), then its output through every
        defense, kept in the yielded box for their terms on the loss."""
        box: dict[str, torch.Tensor] = {}
        live = [d for d in self.defenses if d.active and not self.paused]

        def hook(module, args, output):
            for d in live:
                if args:
                    d.inputs(args[0])
                output = d.embeddings(output, step, micro)
            box["embeds"] = output
            return output

        def substitute(module, args, kwargs):
            ids = args[0] if args else kwargs["input"]
            for d in live:
                ids = d.tokens(ids, step, micro)
            return ((ids, *args[1:]), kwargs) if args else (args, {**kwargs, "input": ids})

        handles = [self.embedding.register_forward_hook(hook)] if live else []
        if any(type(d).tokens is not Defense.tokens for d in live):
            handles.append(self.embedding.register_forward_pre_hook(substitute, with_kwargs=True))
        try:
            yield box
        finally:
            for handle in handles:
                handle.remove()

    def penalty(self, box: dict[str, torch.Tensor], hidden: torch.Tensor, mask: torch.Tensor,
                share: float) -> dict[str, torch.Tensor]:
        """Each defense's term on the bottom's loss for one training micro-batch, by defense name."""
        if "embeds" not in box:
            return {}
        terms = {d.name: d.penalty(box["embeds"], hidden, mask, share) for d in self.defenses if d.active}
        return {name: t for name, t in terms.items() if t is not None}

    def figures(self, penalties: dict[str, float]) -> dict[str, float]:
        """The step's figures for its metrics row, from each defense's summed terms."""
        out: dict[str, float] = {}
        for d in self.defenses:
            out.update(d.figures(penalties.get(d.name, 0.0)))
        return out

    def begin(self, samples: int) -> None:
        for d in self.defenses:
            d.begin(samples)

    def at(self, offset: int) -> None:
        for d in self.defenses:
            d.at(offset)

    def before_optimizer(self) -> None:
        for d in self.defenses:
            d.before_optimizer()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{d.name}.{k}": v for d in self.defenses for k, v in d.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for d in self.defenses:
            d.load_state_dict({k.partition(".")[2]: v for k, v in state.items() if k.partition(".")[0] == d.name})

    def close(self) -> None:
        for d in self.defenses:
            d.close()
