"""What a model's parts weigh and what they train, read from its config on the meta device (no weights).

Blocks of one architecture are alike, so block 0 stands for all. A tied head is the embedding matrix:
counted with the embeddings, and again for a party that holds the head without them (the two-part server).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LoraConfig
from ..models.adapters import default_target_modules, linear_names
from ..models.arch import ArchSpec, empty_model
from ..models.partition import DTYPES

ITEMSIZE = {name: torch.empty((), dtype=d).element_size() for name, d in DTYPES.items()}


@dataclass(frozen=True)
class ModelSizes:
    model_type: str
    n_blocks: int
    width: int
    vocab: int
    heads: int
    ffn: int
    block_params: int
    pre_params: int  # embeddings and whatever runs before block 0 (a tied head included)
    post_params: int  # final norm and head, without a tied head's embedding matrix
    tied_params: int  # the head's weight when it is the embedding matrix
    lora_params: int  # LoRA factors of one block at the configured rank and targets
    linear_params: int = 0  # weights of one block's linear layers: what quantize: packs
    linear_rows: int = 0  # their output rows (LLM.int8 keeps one float32 scale per row)

    def block_bytes(self, itemsize: int, quantize: str = "none", double_quant: bool = False) -> int:
        """One block's weights as a party stores them: packed linear weights with their constants under ``quantize``
        (bitsandbytes' layouts: 4-bit in blocks of 64 with a float32 absmax, or with double quantization a byte
        absmax and a float32 one per 256 of those), everything else at ``itemsize``."""
        lin, rest = self.linear_params, self.block_params - self.linear_params
        if quantize in ("nf4", "fp4"):
            constants = lin / 64 * (1 + 4 / 256) if double_quant else lin / 64 * 4
            return int(rest * itemsize + lin / 2 + constants)
        if quantize == "int8":
            return int(rest * itemsize + lin + 4 * self.linear_rows)
        return self.block_params * itemsize

    def trainable(self, mode: str, blocks: int, pre: bool = False, post: bool = False) -> int:
        """Parameters one segment trains: LoRA factors on its blocks, or all its weights (``full``)."""
        if mode == "lora":
            return blocks * self.lora_params
        if mode == "full":
            return blocks * self.block_params + (self.pre_params if pre else 0) + (self.post_params if post else 0)
        return 0


def _leaf_in(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_params(block: nn.Module, model_type: str, lora: LoraConfig) -> int:
    """r · (in + out) for every linear layer of ``block`` the LoRA targets name (peft's suffix match)."""
    targets = lora.target_modules if lora.target_modules is not None else default_target_modules(model_type)
    if targets == "all-linear":
        targets = linear_names(block, model_type)
    elif isinstance(targets, str):
        targets = [targets]
    total = 0
    for name, module in block.named_modules():
        if not name or not _leaf_in(name, list(targets)):
            continue
        if isinstance(module, nn.Linear):
            total += lora.rank * (module.in_features + module.out_features)
        elif isinstance(module, Conv1D):
            total += lora.rank * sum(module.weight.shape)
    return total


def model_sizes(config, spec: ArchSpec, lora: LoraConfig) -> ModelSizes:
    model = empty_model(config)
    block = model.get_submodule(spec.blocks_path)[0]
    owners: dict[int, set[str]] = {}
    numel: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        module = name.rsplit(".", 1)[0]
        tag = "pre" if module in spec.pre else "post" if module in spec.post else "block"
        owners.setdefault(id(p), set()).add(tag)
        numel[id(p)] = p.numel()
    pre = sum(n for pid, n in numel.items() if "pre" in owners[pid])
    post = sum(n for pid, n in numel.items() if "post" in owners[pid] and "pre" not in owners[pid])
    tied = sum(n for pid, n in numel.items() if {"pre", "post"} <= owners[pid])
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    ffn = int(getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or getattr(text, "n_inner", None) or 4 * width)
    linears = [m for m in block.modules() if type(m) is nn.Linear or isinstance(m, Conv1D)]  # what bitsandbytes converts
    return ModelSizes(spec.model_type, spec.n_blocks, width, int(text.vocab_size), heads, ffn,
                      sum(p.numel() for p in block.parameters()), pre, post, tied, lora_params(block, spec.model_type, lora),
                      sum(m.weight.numel() for m in linears),
                      sum(m.weight.shape[1] if isinstance(m, Conv1D) else m.weight.shape[0] for m in linears))
