"""Atomic checkpoints: ``ROOT/step-<t>/`` written under a temporary name and renamed, then ``ROOT/latest``
replaced atomically. A process killed at any instant leaves either the old or the new checkpoint whole.

Contents are safetensors (tensors) and JSON (everything else): no pickle, readable by anyone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .errors import SplittuneError


def save(root: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta))
    for f in (tmp / "tensors.safetensors", tmp / "meta.json"):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    _point_latest(root, step)
    steps = sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*") if p.name.removeprefix("step-").isdigit())
    for old in steps[:-keep]:
        shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    return final


def discard_after(root: Path, step: int) -> None:
    """Forget the checkpoints after ``step`` (0: all of them): a run rolled back to ``step`` (a restarted peer rejoined
    there) must never resume from a step of the timeline it left."""
    for folder in root.glob("step-*"):
        name = folder.name.removeprefix("step-")
        if name.isdigit() and int(name) > step:
            shutil.rmtree(folder, ignore_errors=True)
    if step and (root / f"step-{step}").is_dir():
        _point_latest(root, step)
    else:
        (root / "latest").unlink(missing_ok=True)


def _point_latest(root: Path, step: int) -> None:
    """``latest`` names ``step``, replaced atomically (written under a temporary name, then renamed)."""
    pointer = root / f".latest.tmp-{os.getpid()}"
    pointer.write_text(str(step))
    os.replace(pointer, root / "latest")


def latest(root: Path, warn: Callable[[str], None] | None = None) -> int | None:
    """The newest intact checkpoint's step, or None when there is none. A damaged newest one (a truncated file after a
    full disk or a crash of the disk's cache, an unreadable ``latest``) falls back to the previous one kept beside it,
    and ``warn`` says so; every checkpoint damaged is a CheckpointError naming each problem."""
    pointer = root / "latest"
    if not pointer.exists():
        return None
    kept = sorted((int(p.name.removeprefix("step-")) for p in root.glob("step-*") if p.name.removeprefix("step-").isdigit()),
                  reverse=True)
    try:
        named = int(pointer.read_text())
    except ValueError:
        named = None
    order = ([named] if named is not None else []) + [s for s in kept if s != named and (named is None or s < named)]
    problems = []
    for step in order:
        problem = damage(root / f"step-{step}")
        if problem is None:
            if problems and warn is not None:
                warn(f"{root}: {problems[0]}; resuming from the previous checkpoint, step {step}")
            return step
        problems.append(f"the checkpoint of step {step} is damaged ({problem})")
    raise CheckpointError(f"{root}: " + "; ".join(problems or ["latest names no checkpoint"])
                          + "; no intact checkpoint is left: start the run again in a new directory")


class CheckpointError(SplittuneError, ValueError):
    """No intact checkpoint to resume from."""


def damage(folder: Path) -> str | None:
    """Why ``folder`` cannot be loaded (missing, unreadable meta, truncated or corrupt tensors), or None. Cheap: parses
    the JSON and the safetensors header, whose offsets safetensors checks against the file's length."""
    from safetensors import SafetensorError, safe_open

    if not folder.is_dir():
        return "missing"
    try:
        json.loads((folder / "meta.json").read_text())
        with safe_open(str(folder / "tensors.safetensors"), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except (OSError, ValueError, SafetensorError) as err:
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None


def load(root: Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    folder = root / f"step-{step}"
    if not folder.exists():
        kept = sorted(p.name for p in root.glob("step-*"))
        raise FileNotFoundError(f"no checkpoint for step {step} in {root} (kept: {', '.join(kept) or 'none'})")
    return load_file(str(folder / "tensors.safetensors")), json.loads((folder / "meta.json").read_text())


def pack(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several named groups of tensors in one flat dict (``group/name``)."""
    return {f"{group}/{name}": t for group, tensors in parts.items() for name, t in tensors.items()}


def unpack(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        group, _, name = key.partition("/")
        parts.setdefault(group, {})[name] = t
    return parts
