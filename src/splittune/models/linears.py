"""Which layers of a block LoRA can adapt: the linear layers its forward calls, and the stacked expert weights.

peft adapts a linear layer by wrapping it, so a LoRA there trains only if the forward *calls* the layer. State-space
mixers read some projections' weights directly instead: Mamba's fused training kernel takes ``x_proj``, ``dt_proj``
and ``out_proj`` by their weights, Mamba-2's takes ``out_proj``'s, and Jamba multiplies by ``dt_proj.weight``. A
LoRA on those would never change the output (peft refuses ``out_proj`` on Mamba models for this reason), so
``all-linear`` leaves them out and naming one is refused. Found from the modules' own source, not a list of models.
"""

from __future__ import annotations

import functools
import inspect
import re

from torch import nn
from transformers.pytorch_utils import Conv1D

# ``self.<child>.weight`` used as a tensor (a matmul, a kernel argument); reading its dtype or device is harmless
_WEIGHT_READ = re.compile(r"self\.(\w+)\.weight\b(?!\s*\.\s*(?:dtype|device|shape|size|ndim|is_meta|data_ptr)\b)")


@functools.cache
def _weight_reads(cls: type) -> frozenset[str]:
    """Children whose weight a transformers module class reads directly outside its initialisation."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("transformers."):
            continue
        for attr, fn in vars(klass).items():
            if "init" in attr or not inspect.isfunction(fn):
                continue
            try:
                names.update(_WEIGHT_READ.findall(inspect.getsource(fn)))
            except (OSError, TypeError):  # no source (compiled, generated): nothing known
                continue
    return frozenset(names)


def bypassed(block: nn.Module) -> set[str]:
    """Leaf names of the linear layers in ``block`` whose weight some module reads directly (a LoRA there is ignored)."""
    out: set[str] = set()
    for module in block.modules():
        for child in _weight_reads(type(module)):
            if isinstance(getattr(module, child, None), (nn.Linear, Conv1D)):
                out.add(child)
    return out


def linear_names(block: nn.Module) -> list[str]:
    """Leaf names of the linear layers of ``block`` that LoRA can adapt (what ``all-linear`` means in the blocks)."""
    found = {name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    return sorted(found - bypassed(block))


def expert_weights(block: nn.Module) -> list[str]:
    """Names (in ``block``) of stacked expert weights: 3-D parameters ``[experts, out, in]``, not a convolution's
    kernel (state-space mixers have 3-D conv weights) nor a per-channel mixing vector (RWKV's ``[1, 1, hidden]``)."""
    out = []
    for name, module in block.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        for leaf, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and min(p.shape) > 1:
                out.append(f"{name}.{leaf}" if name else leaf)
    return out
