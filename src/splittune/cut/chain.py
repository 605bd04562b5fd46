"""The chain: per direction, the ordered transforms ``[defense slot] → padding removal → codec`` that every
message crossing the cut passes through, at one end of one session.

The chain's terms are plain data (``{"up": [specs], "down": [specs]}``) that the client proposes in its
hello and the server accepts or refuses (naming the transforms and codecs it has); both ends then build
the very same transforms from them, so frames, bytes and results are those of one code path whichever
channel carries them (DESIGN.md contract 4).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import torch

from ..wire import FrameLimits, Message, decode_frame, encode_frame
from ..wire.codecs import Codec, make_codec
from .transforms import ROLES, ChainError, CodecStage, Crossing, End, Transform, build_transform

DIRECTIONS = ("up", "down")
RAW_TERMS: dict[str, list] = {"up": [], "down": []}  # no transforms: every tensor crosses raw, padding included
HINT = "cut."  # tensors a sender gives its own chain (``cut.keep``); they never cross


def terms_from(codec: dict[str, Any], padding_removal: bool, defense: tuple[dict, ...] = ()) -> dict[str, list]:
    """The chain terms of a run's config: ``codec`` is ``{"up": spec, "down": spec}``, where a spec is a codec
    (a name or ``{name: …, options}``) for every role, or ``{hidden: codec, grad: codec}`` per role."""
    terms = {}
    for direction in DIRECTIONS:
        spec = codec.get(direction, "raw")
        roles = spec if isinstance(spec, dict) and "name" not in spec else {role: spec for role in ROLES}
        chain = [dict(d) for d in defense] if direction == "up" else []
        if padding_removal:
            chain.append({"name": "padding"})
        chain.append({"name": "codec", **roles})
        terms[direction] = chain
    return check_terms(terms)


def check_terms(terms: Any) -> dict[str, list]:
    """``terms`` in plain form, every entry buildable here, or a ChainError naming what is wrong."""
    if not isinstance(terms, dict) or set(terms) != set(DIRECTIONS) or not all(isinstance(terms[d], list) for d in DIRECTIONS):
        raise ChainError(f"chain terms must map 'up' and 'down' to lists of transforms, got {terms!r}")
    return {d: [build_transform(spec).spec() for spec in terms[d]] for d in DIRECTIONS}


class Chain:
    """Both directions' transforms at one end (``side`` is ``client`` or ``server``) of one session."""

    def __init__(self, terms: dict[str, list], side: str, limits: FrameLimits = FrameLimits(), secret: int | None = None):
        """``secret``: the sending end's private seed for its defenses' noise (``defenses/noise.py``); it never travels."""
        self.terms = terms
        self.side = side
        self.limits = limits
        self.transforms: dict[str, list[Transform]] = {d: [build_transform(s) for s in terms[d]] for d in DIRECTIONS}
        self.end = End()
        self.sending, self.receiving = ("up", "down") if side == "client" else ("down", "up")
        for i, t in enumerate(self.transforms[self.sending]):
            t.bind(secret, f"{self.sending}.{i}.{t.name}")

    def encode(self, msg: Message) -> bytes:
        """``msg`` through this end's sending transforms into a frame (``msg`` itself is left as it was)."""
        tensors = {k: v for k, v in msg.tensors.items() if not k.startswith(HINT)}
        hints = {k: v for k, v in msg.tensors.items() if k.startswith(HINT)}
        crossing = Crossing(Message(msg.kind, msg.session, msg.step, msg.micro, tensors, dict(msg.meta)), hints)
        chain = self.transforms[self.sending]
        for t in chain:
            t.send(crossing, self.end)
        if crossing.cut:
            crossing.msg.meta["cut"] = crossing.cut
        decoded: dict | None = {} if crossing.refs else None
        frame = encode_frame(crossing.msg, crossing.codecs, decoded=decoded)
        for t in chain:
            t.sent(crossing, decoded or {}, self.end)
        return frame

    @contextlib.contextmanager
    def undefended(self) -> Iterator[None]:
        """This end sends without its defenses' transforms for a while: an in-process run's reference evaluation of
        what the adapter does on its own (never over a network, where the server would see undefended activations)."""
        kept = self.transforms[self.sending]
        self.transforms[self.sending] = [t for t in kept if not t.perturbs]
        try:
            yield
        finally:
            self.transforms[self.sending] = kept

    def decode(self, frame: bytes, direction: str | None = None) -> Message:
        """A frame through the receiving transforms (``direction``: another direction's, to see what the other
        end will see)."""
        return self.receive(decode_frame(frame, self.limits), direction)

    def receive(self, msg: Message, direction: str | None = None) -> Message:
        """A decoded message through the receiving transforms, the chain's own ``meta["cut"]`` removed."""
        cut = msg.meta.pop("cut", {})
        if not isinstance(cut, dict):
            raise ChainError(f"meta field 'cut' must be a map, got {type(cut).__name__}")
        for t in reversed(self.transforms[direction or self.receiving]):
            msg = t.receive(msg, cut, self.end)
        if direction is None and "grad" in msg.tensors:
            pullback = self.end.pullbacks.pop((msg.step, msg.micro), None)
            if pullback is not None:
                msg.tensors["grad"] = pullback(msg.tensors["grad"])
        return msg

    def codec_error(self) -> dict[str, float]:
        """Squared codec error and squared norm of the lossy tensors this end sent since the last call."""
        total = {"sq_err": 0.0, "sq_ref": 0.0}
        for t in self.transforms[self.sending]:
            if isinstance(t, CodecStage):
                for k, v in t.take_error().items():
                    total[k] += v
        return total

    def varies(self, direction: str, role: str, width: int) -> str | None:
        """Why a ``role`` tensor may arrive otherwise when sent again in ``direction`` (the first transform's
        reason), or None (``Transform.varies``)."""
        return next((r for t in self.transforms[direction] if (r := t.varies(role, width)) is not None), None)

    def payload_bytes(self, direction: str, role: str, dtype, shape: tuple[int, ...]) -> int:
        """What a ``role`` tensor of ``dtype`` and ``shape`` costs in a frame's payload in ``direction``."""
        stage = next((t for t in self.transforms[direction] if isinstance(t, CodecStage)), None)
        codec = stage.codecs.get(role) if stage is not None else None
        codec = codec or make_codec("raw")
        return codec.encoded_size(dtype, shape, {k: codec.opts[k] for k in codec.params if k in codec.opts})

    def codecs(self, direction: str) -> dict[str, Codec]:
        """The codecs agreed for ``direction``, by name; of one codec under several options, the one whose payloads
        expand most (what a receiver must allow, ``Codec.max_ratio``)."""
        found: dict[str, Codec] = {}
        for t in self.transforms[direction]:
            for codec in (t.codecs.values() if isinstance(t, CodecStage) else ()):
                held = found.get(codec.name)
                if held is None or codec.max_ratio(torch.float32) > held.max_ratio(torch.float32):
                    found[codec.name] = codec
        return found

    def packs(self, direction: str) -> bool:
        """Whether padding removal runs in ``direction``."""
        return any(t.name == "padding" for t in self.transforms[direction])

    @property
    def lossy(self) -> bool:
        return any(isinstance(t, CodecStage) and t.codecs for t in self.transforms[self.sending])

    def state_dict(self) -> dict[str, Any]:
        return {f"{d}.{i}.{k}": v for d in DIRECTIONS for i, t in enumerate(self.transforms[d]) for k, v in t.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for d in DIRECTIONS:
            for i, t in enumerate(self.transforms[d]):
                prefix = f"{d}.{i}."
                t.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


class Stopwatch:
    """Seconds spent in a block, added to a total (``with watch: …``)."""

    def __init__(self):
        self.total = 0.0

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self._t
