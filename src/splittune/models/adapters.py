"""What each segment trains: LoRA adapters (peft), nothing (frozen), or all of its weights (full).

LoRA initialisation is seeded per module *name*, not drawn from one global stream, so an adapter
starts identical whichever party holds it and however the model is cut: split and centralized runs
begin from the same point, which the exactness contract needs.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LoraConfig
from .arch import ArchSpec
from .partition import Segment

PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    pass


def default_target_modules(model_type: str) -> list[str] | str:
    """peft's per-architecture default (attention projections); every linear layer where it has none."""
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or []) or "all-linear"


def canonical_name(name: str) -> str:
    """A trainable tensor's name in the unsplit, unwrapped model (the names PEFT adapter files use)."""
    name = name.removeprefix(PEFT_PREFIX).replace(".default.", ".").replace(".base_layer.", ".")
    return name


def linear_names(block: nn.Module) -> list[str]:
    """Leaf names of every linear layer in a block (what ``all-linear`` means inside the blocks)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def _lora_config(spec: ArchSpec, lora: LoraConfig, blocks: list[int], block: nn.Module) -> PeftLoraConfig:
    targets = lora.target_modules if lora.target_modules is not None else default_target_modules(spec.model_type)
    if targets == "all-linear":  # peft cannot combine its own all-linear with a layer range
        targets = linear_names(block)
    elif isinstance(targets, str):
        targets = [targets]
    uses_conv1d = any(isinstance(m, Conv1D) for name, m in block.named_modules() if name.rsplit(".", 1)[-1] in targets)
    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=blocks,
        layers_pattern=spec.blocks_attr,
        fan_in_fan_out=uses_conv1d,
        bias="none",
    )


def _seeded_lora_init(model: nn.Module, seed: int) -> None:
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict):
            continue
        for adapter in lora_a.values():
            key = canonical_name(f"{name}.lora_A.weight")
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            with torch.no_grad():
                nn.init.kaiming_uniform_(adapter.weight, a=math.sqrt(5), generator=generator)


def apply_training(
    model: nn.Module,
    spec: ArchSpec,
    segments: Iterable[tuple[Segment, str]],
    lora: LoraConfig,
    seed: int,
) -> nn.Module:
    """Wrap ``model`` so that exactly the parameters each (segment, mode) trains require grad."""
    segments = list(segments)
    for p in model.parameters():
        p.requires_grad_(False)
    lora_blocks = sorted(i for seg, mode in segments if mode == "lora" for i in seg.blocks)
    if lora_blocks:
        block = model.get_submodule(spec.blocks_path)[lora_blocks[0]]
        try:
            model = get_peft_model(model, _lora_config(spec, lora, lora_blocks, block))
        except ValueError as err:
            raise AdapterError(f"cannot place LoRA adapters on {spec.model_type}: {err}") from None
        _seeded_lora_init(model, seed)
    full = [seg for seg, mode in segments if mode == "full"]
    if full:
        prefixes = []
        for seg in full:
            prefixes += [spec.block_prefix(i) for i in seg.blocks]
            prefixes += [m + "." for m in (spec.pre if seg.embeds else ()) + (spec.post if seg.head else ())]
        for name, p in model.named_parameters():
            if canonical_name(name).startswith(tuple(prefixes)) and "lora_" not in name:
                p.requires_grad_(True)
    return model


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters under canonical names, in a fixed order."""
    return [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in trainable(model)}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(trainable(model))
    missing, unexpected = set(params) - set(state), set(state) - set(params)
    if missing or unexpected:
        raise AdapterError(f"adapter state does not match this party: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
