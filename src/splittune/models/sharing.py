"""Frozen base weights shared by parties in one process: the runs of one server (``serve --max-runs``), the clients
of one in-process run (a hundred simulated data owners).

Every such party has its own adapters, optimizer and chain, but the frozen weights under their adapters are the
same pretrained tensors: the bank keeps one copy of each and points every party's parameter at it, so another run
or another client costs its adapters and activations, not another copy of the model. A tensor is shared only
when it is the same checkpoint tensor (model fingerprint and name) with the same dtype, device and shape, and
never a quantized one (bitsandbytes packs those in its own parameter types). Whatever writes a base weight in place
(an averaged update folded into it) takes a private copy first (``own``): one run's fold never reaches another's.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from .partition import is_placeholder



class FrozenBank:
    """One copy of each frozen tensor for every party of the process (kept for the process's life: a server serves one
    model, and its runs come and go)."""

    def __init__(self):
        self._tensors: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    def share(self, model: nn.Module, fingerprint: str) -> int:
        """Point ``model``'s frozen plain parameters at the banked copies (banking those not yet there); the bytes this
        model no longer holds on its own."""
        saved = 0
        with self._lock:
            for name, param in model.named_parameters():
                if (param.requires_grad or type(param) is not nn.Parameter or "lora_" in name or param.is_meta
                        or is_placeholder(param)):
                    continue
                key = (fingerprint, _base_name(name), param.dtype, str(param.device), tuple(param.shape))
                banked = self._tensors.setdefault(key, param.data)
                if banked.data_ptr() != param.data_ptr():
                    param.data = banked
                    saved += param.numel() * param.element_size()
        return saved


def _base_name(name: str) -> str:
    """The checkpoint tensor's name, whichever modules peft wrapped (runs may put LoRA on different modules)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def own(param: nn.Parameter) -> None:
    """Give ``param`` storage of its own before it is written in place (a bank may share its current storage)."""
    param.data = param.data.clone()
