"""A deterministic, resumable, endless stream of micro-batches of example indices.

The stream is epoch 0's permutation, then epoch 1's, and so on, cut into batches of ``batch_size``
(a batch may span two epochs, so every batch is full and every example is seen once per epoch).
Epoch ``e`` is shuffled by a generator seeded from ``(seed, e)`` alone, so the position ``(epoch,
position)`` is the whole state: a resumed run draws exactly the batches the interrupted run would have.
Draw batches with ``next(sampler)`` as they are used; a prefetching loader would move the state ahead.
"""

from __future__ import annotations

from typing import Any

from .split import permutation


class ResumableBatchSampler:
    def __init__(self, num_examples: int, batch_size: int, seed: int = 0):
        if num_examples < 1:
            raise ValueError("cannot sample batches from an empty set of examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index into the current epoch's permutation of the next example to draw
        self._order: tuple[int, list[int]] | None = None

    def _permutation(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, permutation(self.num_examples, "batches", self.seed, self.epoch))
        return self._order[1]

    def __iter__(self) -> ResumableBatchSampler:
        return self

    def __next__(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            order = self._permutation()
            take = min(self.batch_size - len(batch), self.num_examples - self.position)
            batch += order[self.position : self.position + take]
            self.position += take
            if self.position == self.num_examples:
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    @property
    def batches_per_epoch(self) -> float:
        return self.num_examples / self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": self.num_examples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state taken with other data, batch size or seed."""
        for key in ("seed", "batch_size", "num_examples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the saved sampler had {key}={state[key]}, this one has {getattr(self, key)}; "
                    "a resumed run must use the same data, batch size and seed"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_examples:
            raise ValueError(
                f"invalid sampler state: epoch={epoch}, position={position} for {self.num_examples} examples"
            )
        self.epoch, self.position = epoch, position
