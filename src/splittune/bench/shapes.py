"""Random-weight checkpoints with the exact shapes of real models, for measuring memory where it matters.

No hub is needed: a checkpoint is the architecture's config (every size as the real model's) and random bf16
weights, written one block per safetensors shard with the index transformers reads, so no more than one block
is ever in memory while writing. The builtin model's tokenizer goes beside them (its ids are a subset of the
larger vocabulary), so the folder loads as any local model does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..models.arch import detect_arch

# The published configs of the models these stand in for (sizes only; the weights are random).
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
STD = 0.02  # the initializer range of both configs


def shape_config(name: str):
    from transformers import LlamaConfig

    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; shapes: {', '.join(SHAPES)}")
    return LlamaConfig(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **SHAPES[name])


def build_checkpoint(name: str, out: Path, seed: int = 0, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the ``name``-shaped random checkpoint into ``out`` (skipped when it is there already); returns ``out``."""
    out = Path(out)
    if (out / "model.safetensors.index.json").is_file():
        return out
    from transformers import AutoModelForCausalLM

    from ..models.zoo import resolve_model

    config = shape_config(name)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    spec = detect_arch(config)
    names = [n for n, _ in skeleton.named_parameters()]  # a tied head is not listed twice
    shards: dict[str, list[str]] = {}
    for n in names:
        index = n.split(".")[2] if n.startswith(spec.blocks_path + ".") else None
        shards.setdefault(f"block-{int(index):03d}" if index is not None else "outer", []).append(n)
    shapes = dict(skeleton.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, sum(p.numel() * 2 for p in shapes.values())
    for k, (shard, keys) in enumerate(sorted(shards.items())):
        tensors = {}
        for key in keys:
            shape = shapes[key].shape
            if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
                tensors[key] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[key] = (torch.randn(shape, generator=generator) * STD).to(torch.bfloat16)
        filename = f"model-{shard}.safetensors"
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        weight_map.update({key: filename for key in keys})
        del tensors
        if progress is not None:
            progress(k + 1, len(shards))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.dtype = "bfloat16"
    config.save_pretrained(str(out))
    resolve_model("builtin:smollm2-135m").tokenizer().save_pretrained(str(out))
    return out
