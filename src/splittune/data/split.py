"""Seeded, platform-independent choices: permutations, train/eval splits, caps.

Every random choice in the data module derives its generator from a string key (a purpose plus the
run seed), so choices are independent of each other and identical from run to run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

import torch

from .errors import DataError

T = TypeVar("T")


def seed_for(*key: object) -> int:
    """A 63-bit generator seed from a key such as ("split", seed): stable across processes and platforms."""
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def permutation(n: int, *key: object) -> list[int]:
    generator = torch.Generator().manual_seed(seed_for(*key))
    return torch.randperm(n, generator=generator).tolist()


def split_indices(n: int, eval_fraction: float, seed: int, unit: str = "documents") -> tuple[list[int], list[int]]:
    """Hold out ``round(n * eval_fraction)`` (at least one) of ``n`` items; both parts in source order."""
    if n < 2:
        raise DataError(f"the source has {n} {unit}; at least 2 are needed to hold one out for evaluation")
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    order = permutation(n, "split", seed)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def cap(items: Sequence[T], limit: int | None, *key: object) -> list[T]:
    """At most ``limit`` items, a seeded sample kept in order (the first ones could all be one document)."""
    if limit is None or len(items) <= limit:
        return list(items)
    return [items[i] for i in sorted(permutation(len(items), "cap", *key)[:limit])]
