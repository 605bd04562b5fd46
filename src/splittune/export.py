"""Stage 8 (export): the parties' adapters joined into one standard PEFT adapter for the unsplit model.

Party adapter files already use the unsplit model's tensor names (blocks keep their global indices),
so joining is a union; the adapter config records exactly the modules and blocks that carry LoRA.
``merge`` also writes full weights with the adapters folded in (and any fully trained tensors).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from safetensors.torch import load_file, save_file

from .config import load_config
from .models.adapters import PEFT_PREFIX
from .models.arch import detect_arch
from .models.zoo import resolve_model
from .runner import ADAPTERS


class ExportError(ValueError):
    pass


def read_run_adapters(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = run_dir / ADAPTERS
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise ExportError(f"{run_dir} is not a finished run directory: {manifest_path} is missing")
    manifest = json.loads(manifest_path.read_text())
    state: dict[str, torch.Tensor] = {}
    for party, entry in manifest["files"].items():
        part = load_file(str(folder / entry["file"]))
        overlap = set(part) & set(state)
        if overlap:
            raise ExportError(f"two parties hold the same tensors, e.g. {sorted(overlap)[:2]}; the run directory is inconsistent")
        state.update(part)
    return state, manifest


def export_run(run_dir: Path, out: Path, merge: bool = False) -> dict:
    run_dir, out = Path(run_dir), Path(out)
    state, manifest = read_run_adapters(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    source = resolve_model(cfg.model)
    spec = detect_arch(source.config())
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    full = {k: v for k, v in state.items() if ".lora_" not in k}
    if full and not merge:
        segs = [s for s, mode in manifest["segments"].items() if mode == "full"]
        raise ExportError(
            f"segments {segs} trained all their weights ({len(full)} tensors), which a LoRA adapter cannot hold; "
            "export with --merge to write full weights"
        )
    out.mkdir(parents=True, exist_ok=True)
    info = {"run": str(run_dir), "out": str(out), "lora_tensors": len(lora), "full_tensors": len(full)}
    if lora:
        peft_config = _adapter_config(lora, spec, cfg, source, manifest.get("fan_in_fan_out", False))
        peft_config.save_pretrained(str(out))
        save_file({PEFT_PREFIX + k: v.contiguous() for k, v in lora.items()}, str(out / "adapter_model.safetensors"))
        info.update(target_modules=sorted(peft_config.target_modules), layers=peft_config.layers_to_transform)
    if merge:
        _merge(source, out, lora, full)
        info["merged"] = True
    return info


def _adapter_config(lora: dict[str, torch.Tensor], spec, cfg, source, fan_in_fan_out: bool) -> PeftLoraConfig:
    pattern = re.compile(re.escape(spec.blocks_path) + r"\.(\d+)\.(.+)\.lora_[AB]\.weight$")
    modules, layers = set(), set()
    for name in lora:
        m = pattern.match(name)
        if m is None:
            raise ExportError(f"adapter tensor {name!r} is not inside a block of {spec.blocks_path}")
        layers.add(int(m.group(1)))
        modules.add(m.group(2).rsplit(".", 1)[-1])
    first_a = next(v for k, v in lora.items() if k.endswith("lora_A.weight"))
    base = str(source.path) if source.path else source.repo_id
    return PeftLoraConfig(
        r=int(first_a.shape[0]),
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=sorted(modules),
        layers_to_transform=sorted(layers),
        layers_pattern=spec.blocks_attr,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        base_model_name_or_path=cfg.model if not cfg.model.startswith(("builtin:", "tiny:")) else base,
        task_type="CAUSAL_LM",
    )


def _merge(source, out: Path, lora: dict, full: dict) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(source.path) if source.path else source.repo_id, dtype=torch.float32)
    if full:
        missing = set(full) - set(base.state_dict())
        if missing:
            raise ExportError(f"fully trained tensors not in the base model: {sorted(missing)[:3]}")
        base.load_state_dict(full, strict=False)
    model = PeftModel.from_pretrained(base, str(out)).merge_and_unload() if lora else base
    merged = out / "merged"
    model.save_pretrained(str(merged))
    source.tokenizer().save_pretrained(str(merged))
