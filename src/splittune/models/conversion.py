"""Checkpoint tensors to model parameters through transformers' own conversion mapping, one party at a time.

Checkpoints often store tensors in another layout than the modules that load them: old names
(``embed_out`` for ``lm_head``), or one tensor per expert where transformers fuses a block's experts into
one parameter on load (Mixtral, Qwen3-MoE and most MoE models). transformers converts a whole state dict;
a party must read only its own blocks' tensors (DESIGN.md contract 3), so each target parameter here gets
its own copy of transformers' converter, fed with just the checkpoint tensors that make it, in the order
transformers would feed them (experts 0, 1, …, 10, not 0, 1, 10).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass
class Fused:
    """One converter's output: checkpoint keys (with the source pattern each matched) → one or more parameters."""

    converter: object  # transformers.core_model_loading.WeightConverter, the template (never mutated)
    first: str  # the parameter name transformers keys the conversion by
    sources: list[tuple[str, str]] = field(default_factory=list)  # (source pattern, checkpoint key), in load order

    @property
    def keys(self) -> list[str]:
        return [key for _, key in self.sources]

    def convert(self, model: nn.Module, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Read this conversion's tensors (``read(key)``) and run transformers' operations on them."""
        converter = copy.deepcopy(self.converter)
        for pattern, key in self.sources:
            tensor = read(key)
            converter.add_tensor(self.first, key, pattern, lambda t=tensor: t)  # callables: transformers' sync path
        out = converter.convert(self.first, model=model, config=model.config)
        return {name: (t[0] if isinstance(t, list) else t) for name, t in out.items()}


def key_plan(model: nn.Module, weight_map: dict[str, str]) -> dict[str, str | Fused]:
    """Model parameter (or buffer) name → the checkpoint key it loads from, or the :class:`Fused` conversion
    that makes it. The same renamings and converters transformers applies in ``from_pretrained``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = dict(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", None) or None
    plan: dict[str, str | Fused] = {}
    for key in sorted(weight_map, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:  # the key was right as it was (transformers' own fallback)
            name, pattern = rename_source_key(key, [], [], prefix, meta)
        if pattern is None:
            plan[name] = key
            continue
        conv = by_pattern[pattern]
        fused = plan.get(name)
        if not isinstance(fused, Fused):
            fused = Fused(conv, name)
            for target in conv.target_patterns:  # one-to-many conversions (a fused qkv split in three) name each output
                plan[name.replace(conv.target_patterns[0], target)] = fused
        fused.sources.append((pattern, key))
    return plan
