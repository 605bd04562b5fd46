"""Which layers of a block LoRA can adapt: the linear layers its forward calls, and the stacked expert weights.

peft adapts a linear layer by wrapping it, so a LoRA there trains only if the forward *calls* the layer. State-space
mixers read some projections' weights directly instead: Mamba's fused training kernel takes ``x_proj``, ``dt_proj``
and ``out_proj`` by their weights, Mamba-2's takes ``out_proj``'s, and Jamba multiplies by ``dt_proj.weight``. A
LoRA on those would never change the output (peft refuses ``out_proj`` on Mamba models for this reason), so
``all-linear`` leaves them out and naming one is refused. Found from the modules' own source, not a list of models.
peft may refuse more for a model type than the forward bypasses (``out_proj`` on every Mamba-like type, whatever the
installed transformers does with it): those are asked of peft's own check, so defaults follow both libraries as they move.
"""

from __future__ import annotations

import functools
import inspect
import re
from types import SimpleNamespace

import torch
from peft import LoraConfig
from peft.tuners import tuners_utils
from torch import nn
from transformers.pytorch_utils import Conv1D

from .quantize import is_quantized

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


_verdicts: dict[type, bool] = {}


def behaves_as_linear(module: nn.Module) -> bool:
    """A linear layer peft can wrap: one whose forward returns a tensor. Some subclasses return more (Phi-MoE's and
    Llama 4's routers return scores and logits), so peft's wrapper would fail on them. Asked once per class, on a row
    of zeros on the weight's device (meta for a party's unloaded blocks)."""
    kind = type(module)
    if kind in (nn.Linear, Conv1D) or is_quantized(module):  # a quantized layer is a linear one, packed
        return True
    if kind not in _verdicts:
        weight = module.weight
        width = weight.shape[0] if isinstance(module, Conv1D) else weight.shape[1]
        try:
            with torch.no_grad():
                out = module(torch.zeros(1, width, dtype=weight.dtype, device=weight.device))
            _verdicts[kind] = isinstance(out, torch.Tensor)
        except Exception:  # noqa: BLE001 (a forward that needs more than a row of features is no plain linear)
            _verdicts[kind] = False
    return _verdicts[kind]


def peft_refuses(model_type: str | None, name: str) -> bool:
    """Whether peft refuses a LoRA on layer ``name`` of a ``model_type`` model (its Mamba guard; none if it has none)."""
    check = getattr(tuners_utils, "_check_lora_target_modules_mamba", None)
    if check is None or model_type is None:
        return False
    try:
        check(LoraConfig(), SimpleNamespace(config=SimpleNamespace(model_type=model_type)), name)
    except ValueError:
        return True
    return False


def linear_names(block: nn.Module, model_type: str | None = None) -> list[str]:
    """Leaf names of the linear layers of ``block`` that LoRA can adapt (what ``all-linear`` means in the blocks):
    those the forward calls, less any peft refuses for ``model_type``."""
    found = {name.rsplit(".", 1)[-1] for name, m in block.named_modules()
             if isinstance(m, (nn.Linear, Conv1D)) and behaves_as_linear(m)}
    return sorted(n for n in found - bypassed(block) if not peft_refuses(model_type, n))


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
