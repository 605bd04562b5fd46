"""The adapter directory a run writes (``RUN_DIR/adapters``): each party's trainable tensors, or their average,
under the unsplit model's names in safetensors, with a manifest; ``export.py`` reads it back into one PEFT adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import RunConfig
from ..parties.server.group import personal_names
from ..schedules.policy import policy_for
from ..wire.names import FOLD, split, tag
from .assemble import Fleet


ADAPTERS = "adapters"


def _save(root: Path, folder: Path, name: str, state: dict[str, torch.Tensor], role: str) -> dict:
    path = folder / f"{name}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata={"party": role, "format": "splittune-adapter"})
    return {"file": str(path.relative_to(root)), "tensors": len(state), "params": sum(v.numel() for v in state.values())}


def save_adapters(folder: Path, fleet: Fleet, cfg: RunConfig) -> None:
    """The global model's trainable tensors (each party's part, or the average), under the unsplit model's
    names, in safetensors; with several clients also each client's own (personalised) model."""
    folder.mkdir(parents=True, exist_ok=True)
    clients = fleet.clients
    first = clients[0]
    manifest = {"model": cfg.model, "cuts": list(cfg.cuts) if cfg.cuts is not None else None, "shape": first.plan.shape,
                "segments": cfg.segments.model_dump(), "lora": cfg.lora.model_dump(), "files": {}, "clients": {},
                "fan_in_fan_out": bool(first.party.fan_in_fan_out or first.server_info.get("fan_in_fan_out"))}
    several = cfg.clients > 1 and cfg.mode != "centralized"
    averaged = several and policy_for(cfg.mode, cfg.schedule).averages(cfg.clients)
    if averaged:
        parts = {"global": first.global_state()}
    else:
        parts = {"client": first.party.state(), "server": first.server_state()}
    for name, state in parts.items():
        if state:
            manifest["files"][name] = _save(folder, folder, name, state, name)
    if several:
        folds = split(FOLD, parts.get("global", {}))[1]  # by module
        for i, client in zip(fleet.indices, clients):
            sub = folder / f"client{i}"
            sub.mkdir(exist_ok=True)
            own = client.party.state()
            keep = personal_names(own, client.plan, set(cfg.personal), client.party.spec)
            mine = tag(FOLD, {m: v for m, v in folds.items() if f"{m}.lora_A.weight" not in keep})
            files = {}
            for name, state in (("client", own), ("server", client.server_state()), ("folds", mine)):
                if state:
                    files[name] = _save(folder, sub, name, state, f"client {i}")
            manifest["clients"][str(i)] = files
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
