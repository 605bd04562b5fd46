"""Where every defense's noise comes from: a secret that never leaves the client, keyed by what is drawn.

A training draw is keyed by (step, micro-batch), so its noise does not depend on how many evaluations came before
(in-process and deployed runs route evaluations differently) and a resumed run draws the same; an evaluation
draw is keyed by a count, kept in the defense's checkpointed state.
"""

from __future__ import annotations

import hashlib
import secrets

import torch

from ..cut.transforms import ChainError, Transform


def noise_generator(secret: int, label: str, count: int) -> torch.Generator:
    """A generator for crossing ``count`` of the stream ``label``, seeded by a hash of the client's secret."""
    digest = hashlib.blake2b(f"{secret}:{label}:{count}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class NoiseStream:
    """One defense's noise on one client: training draws keyed by (step, micro-batch), evaluation draws by a count
    (their only state, checkpointed)."""

    def __init__(self, secret: int, label: str):
        self.secret, self.label, self.count = int(secret), label, 0

    def draw(self, step: int, micro: int = 0) -> torch.Generator:
        """The generator of training ``step`` and ``micro``-batch (step 0: the next evaluation draw)."""
        if step > 0:
            return noise_generator(self.secret, f"{self.label}:train:{step}", micro)
        self.count += 1
        return noise_generator(self.secret, f"{self.label}:eval", self.count)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor([self.count], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "count" in state:
            self.count = int(state["count"][0])


class DrawsNoise:
    """A client-side defense whose only state is its noise stream (``self.noise``), checkpointed with the client."""

    noise: NoiseStream

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.noise.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.noise.load_state_dict(state)


class NoisyTransform(Transform):
    """A transform of the chain's defense slot: the sending end binds its secret (the chain does, ``Chain(secret=)``);
    the receiving end builds the same transform to know what it receives, and draws nothing."""

    perturbs = True

    def __init__(self):
        self.stream: NoiseStream | None = None

    def bind(self, secret: int | None, label: str) -> None:
        """The sending end's secret (None: a fresh random one, for tools that never resume) and stream label."""
        self.stream = NoiseStream(secrets.randbits(63) if secret is None else secret, label)

    def generator(self, step: int, micro: int) -> torch.Generator:
        if self.stream is None:
            raise ChainError(f"the {self.name!r} defense draws noise only on the client's end, which binds its secret")
        return self.stream.draw(step, micro)

    def state_dict(self):
        return self.stream.state_dict() if self.stream is not None else {}

    def load_state_dict(self, state):
        if self.stream is not None:
            self.stream.load_state_dict(state)
