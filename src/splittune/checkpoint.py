"""Atomic checkpoints: ``ROOT/step-<t>/`` written under a temporary name and renamed, then ``ROOT/latest``
replaced atomically. A process killed at any instant leaves either the old or the new checkpoint whole.

Contents are safetensors (tensors) and JSON (everything else): no pickle, readable by anyone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


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
    pointer = root / f".latest.tmp-{os.getpid()}"
    pointer.write_text(str(step))
    os.replace(pointer, root / "latest")
    steps = sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*") if p.name.removeprefix("step-").isdigit())
    for old in steps[:-keep]:
        shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    return final


def latest(root: Path) -> int | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    return int(pointer.read_text())


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
