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

from .errors import SplittuneError
from .config import load_config
from .models.adapters import PEFT_PREFIX, expert_parameters, quiet_peft
from .models.arch import detect_arch
from .models.linears import expert_weights
from .models.zoo import resolve_model
from .run import ADAPTERS
from .averaging import low_rank
from .wire.names import FOLD, split


class ExportError(SplittuneError, ValueError):
    pass


def read_run_adapters(run_dir: Path, client: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The global model's tensors of a run (or, with ``client``, that client's personalised model)."""
    folder = run_dir / ADAPTERS
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise ExportError(f"{run_dir} is not a finished run directory: {manifest_path} is missing")
    manifest = json.loads(manifest_path.read_text())
    files = manifest["files"]
    if client is not None:
        clients = manifest.get("clients", {})
        if not clients:
            raise ExportError(f"{run_dir} is a single-client run; it has no per-client adapters (export without --client)")
        if str(client) not in clients:
            raise ExportError(f"{run_dir} has clients 0..{len(clients) - 1}; there is no client {client}")
        files = clients[str(client)]
    state: dict[str, torch.Tensor] = {}
    for party, entry in files.items():
        part = load_file(str(folder / entry["file"]))
        overlap = set(part) & set(state)
        if overlap:
            raise ExportError(f"two parties hold the same tensors, e.g. {sorted(overlap)[:2]}; the run directory is inconsistent")
        state.update(part)
    return state, manifest


def export_run(run_dir: Path, out: Path, merge: bool = False, client: int | None = None, force: bool = False) -> dict:
    """Write the run's adapter as one PEFT adapter directory with the tokenizer beside it, naming as its base the
    model the user gave (a hub id when there is one), so it loads on another machine; an existing non-empty
    ``out`` is refused unless ``force``."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; export writes a directory (adapter_config.json, adapter_model.safetensors)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} already holds files ({', '.join(sorted(p.name for p in out.iterdir())[:4])}); "
                          "choose another directory, or --force to overwrite")
    state, manifest = read_run_adapters(run_dir, client)
    cfg = load_config(run_dir / "config.yaml")
    source = resolve_model(cfg.model)
    spec = detect_arch(source.config())
    fan_in_fan_out = manifest.get("fan_in_fan_out", False)
    lora, ranks, alphas = _lora_tensors(state, cfg.lora.alpha)
    names: list[str] = []
    if cfg.lora.experts:  # an expert wrapper's factors stack one rank-r LoRA per expert
        names, count = _expert_parameters(source, spec)
        wrapped = {n.rsplit(".", 1)[0] for n in names}
        ranks = {m: r // count if m.replace(".base_layer", "") in wrapped else r for m, r in ranks.items()}
    full = {k: v for k, v in split(FOLD, state)[0].items() if ".lora_" not in k}
    if full and not merge:
        segs = [s for s, mode in manifest["segments"].items() if mode == "full"]
        raise ExportError(
            f"segments {segs} trained all their weights ({len(full)} tensors), which a LoRA adapter cannot hold; "
            "export with --merge to write full weights"
        )
    out.mkdir(parents=True, exist_ok=True)
    info = {"run": str(run_dir), "out": str(out), "lora_tensors": len(lora), "full_tensors": len(full),
            "base_model": base_reference(cfg.model, source)}
    if client is not None:
        info["client"] = client
    if lora:
        peft_config = _adapter_config(lora, spec, cfg, source, fan_in_fan_out, ranks, alphas, names)
        peft_config.save_pretrained(str(out))
        save_file({PEFT_PREFIX + k: v.contiguous() for k, v in lora.items()}, str(out / "adapter_model.safetensors"))
        source.tokenizer().save_pretrained(str(out))  # the adapter's own tokenizer: AutoTokenizer.from_pretrained(out)
        info.update(target_modules=sorted(peft_config.target_modules), layers=peft_config.layers_to_transform,
                    ranks=sorted(set(ranks.values())))
    if merge:
        _merge(source, out, lora, full)
        info["merged"] = True
    return info


def _lora_tensors(state: dict[str, torch.Tensor], alpha: float) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """LoRA factors per module, with each module's rank and alpha.

    Modules whose update was moved into the base weights by an exact rank-heterogeneous average
    (``fold::`` entries) are factored again: their whole update (folds plus what LoRA learned since) is
    written as exact-rank factors with scale 1, so the one PEFT adapter reproduces it.
    """
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    ranks = {k.removesuffix(".lora_A.weight"): int(v.shape[0]) for k, v in lora.items() if k.endswith(".lora_A.weight")}
    alphas = {m: alpha for m in ranks}
    for module, delta in split(FOLD, state)[1].items():
        total = delta.double()
        if module in ranks:
            a, b = lora[f"{module}.lora_A.weight"].double(), lora[f"{module}.lora_B.weight"].double()
            total = total + (alphas[module] / ranks[module]) * (b @ a)
        b, a = low_rank(total)
        lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"] = a.float().contiguous(), b.float().contiguous()
        ranks[module], alphas[module] = int(a.shape[0]), float(a.shape[0])
    return lora, ranks, alphas


def _adapter_config(lora: dict[str, torch.Tensor], spec, cfg, source, fan_in_fan_out: bool,
                    ranks: dict[str, int], alphas: dict[str, float], experts: list[str] = ()) -> PeftLoraConfig:
    pattern = re.compile(re.escape(spec.blocks_path) + r"\.(\d+)\.(.+)\.lora_[AB]\.weight$")
    modules, layers = set(), set()
    wrapped = {name.rsplit(".", 1)[0] for name in experts}  # modules whose stacked weights carry LoRA (not target_modules)
    for name in lora:
        m = pattern.match(name)
        if m is None:
            raise ExportError(f"adapter tensor {name!r} is not inside a block of {spec.blocks_path}")
        layers.add(int(m.group(1)))
        module = m.group(2).replace(".base_layer", "")
        if f"{spec.blocks_path}.{m.group(1)}.{module}" not in wrapped:
            modules.add(module.rsplit(".", 1)[-1])
    rank = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank; others by pattern
    return PeftLoraConfig(
        r=rank,
        lora_alpha=cfg.lora.alpha,
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(m): a for m, a in alphas.items() if a != cfg.lora.alpha},
        lora_dropout=cfg.lora.dropout,
        target_modules=sorted(modules),
        # the training run's order: peft nests one wrapper per stacked weight, and the saved names follow the nesting
        target_parameters=[n for n in experts if int(n[len(spec.blocks_path) + 1:].split(".", 1)[0]) in layers] or None,
        layers_to_transform=sorted(layers),
        layers_pattern=spec.blocks_attr,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        base_model_name_or_path=base_reference(cfg.model, source),
        task_type="CAUSAL_LM",
    )


def base_reference(model: str, source) -> str:
    """What the adapter names as its base: the reference the user gave (a hub id, or their own directory as they
    wrote it); a builtin model's hub id (its weights here are the GGUF release's, dequantized: the hub's full
    precision weights differ by that rounding); a tiny test model's directory (it exists nowhere else)."""
    if model.startswith("builtin:"):
        from .models.builtin import BUILTIN_MODELS

        return BUILTIN_MODELS[model.removeprefix("builtin:")].hub_id
    if model.startswith("tiny:"):
        return str(source.path)
    return model


def _expert_parameters(source, spec) -> tuple[list[str], int]:
    """The stacked expert weights of every block, in the order training targeted them (``adapters.expert_parameters``),
    and how many experts each stacks (a wrapper's LoRA factors have rank × experts rows)."""
    from .models.arch import empty_model

    blocks = empty_model(source.config()).get_submodule(spec.blocks_path)
    names = expert_parameters(spec, blocks, list(range(spec.n_blocks)))
    first = blocks[spec.expert_blocks[0]]
    return names, int(first.get_parameter(expert_weights(first)[0]).shape[0])


def _merge(source, out: Path, lora: dict, full: dict) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(source.path) if source.path else source.repo_id, dtype=torch.float32)
    if full:
        missing = set(full) - set(base.state_dict())
        if missing:
            raise ExportError(f"fully trained tensors not in the base model: {sorted(missing)[:3]}")
        base.load_state_dict(full, strict=False)
    with quiet_peft():
        model = PeftModel.from_pretrained(base, str(out)).merge_and_unload() if lora else base
    merged = out / "merged"
    model.save_pretrained(str(merged))
    source.tokenizer().save_pretrained(str(merged))
