"""A small module a defense trains on the client with its own Adam (``mid``'s bottleneck, ``adversarial``'s simulated
inverter): its weights and its optimizer's moments are the defense's checkpointed state, so a resumed run continues
exactly. It stays with the client that trained it: never sent, never averaged, not part of the exported adapter."""

from __future__ import annotations

import torch
from torch import nn


class Trained:
    """``module``'s parameters under an Adam of rate ``lr`` whose step count and moments travel as plain tensors."""

    def __init__(self, module: nn.Module, lr: float):
        self.module = module
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam([p for _, p in self.named], lr=lr)

    def has_grad(self) -> bool:
        return any(p.grad is not None for _, p in self.named)

    def step(self) -> None:
        """One Adam step on the gradients accumulated since the last one (none: nothing happens)."""
        if self.has_grad():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def to(self, device: torch.device) -> None:
        """Move the module and its optimizer's moments (a bottleneck restored on the CPU, used on an accelerator)."""
        if next(self.module.parameters()).device == device:
            return
        self.module.to(device)  # the parameters stay the same objects: the optimizer keeps them
        for st in self.optimizer.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = st[k].to(device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"w.{n}": t.detach().clone() for n, t in self.module.state_dict().items()}
        for n, p in self.named:
            st = self.optimizer.state.get(p)
            if st:
                out[f"adam.{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).clone()
                out[f"adam.{n}.exp_avg"] = st["exp_avg"].clone()
                out[f"adam.{n}.exp_avg_sq"] = st["exp_avg_sq"].clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        weights = {k[2:]: v for k, v in state.items() if k.startswith("w.")}
        if weights:
            self.module.load_state_dict(weights)
        for n, p in self.named:
            if f"adam.{n}.step" in state:
                self.optimizer.state[p] = {"step": state[f"adam.{n}.step"].reshape(()).clone(),
                                           "exp_avg": state[f"adam.{n}.exp_avg"].to(p.device, copy=True),
                                           "exp_avg_sq": state[f"adam.{n}.exp_avg_sq"].to(p.device, copy=True)}
