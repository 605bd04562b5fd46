"""Tensor names with a meaning beyond a parameter's: ``fold::MODULE`` is an update an exact rank-heterogeneous average
moved into a base weight (``fold::MODULE::B`` and ``::A``: its factors, on the way to a client), ``opt::NAME`` an
optimizer moment handed on with the model (the sequential relay). One helper splits and tags them everywhere."""

from __future__ import annotations

from typing import TypeVar

FOLD = "fold::"
OPT = "opt::"

T = TypeVar("T")


def tag(prefix: str, tensors: dict[str, T]) -> dict[str, T]:
    """``tensors`` under ``prefix``."""
    return {prefix + k: v for k, v in tensors.items()}


def split(prefix: str, tensors: dict[str, T]) -> tuple[dict[str, T], dict[str, T]]:
    """``tensors`` without the names under ``prefix``, and those names' tensors with the prefix removed."""
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    tagged = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    return rest, tagged
