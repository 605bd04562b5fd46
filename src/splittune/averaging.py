"""Stage 7, aggregate: combine the trainable tensors of several clients (FedAvg), as pure math.

Tensors are named canonically (names of the unsplit model), so contributions line up by name
whoever held them. Averaging is *block-wise*: a tensor is averaged over the contributions that hold
it, with their weights renormalised, because not every party trains every block.

LoRA modules are averaged one of two ways:

- Same rank and alpha everywhere: the factors are FedAvg'd separately (``A = Σ w_i A_i``,
  ``B = Σ w_i B_i``), the standard FedAvg of LoRA (FedIT); the module keeps training as LoRA.
- Ranks or alphas differ: a mean of factors is not even defined (shapes differ), and the usual
  work-arounds are not exact: zero-padding to the largest rank (HetLoRA) averages factors, not
  products, and re-truncating an SVD (FlexLoRA) drops part of the update. Instead the products are
  averaged exactly by stacking (FLoRA, Wang et al. 2024):
  ``ΔW_g = Σ_i w_i s_i B_i A_i = [w_1 s_1 B_1 | w_2 s_2 B_2 | …] @ [A_1; A_2; …]`` with
  ``s_i = alpha_i / r_i``. The caller folds ``ΔW_g`` into every holder's frozen base weight and
  restarts the module's LoRA with ``B = 0``, so every party ends with the same effective weight
  ``W + ΔW_g``, and what travels stays the size of the adapters (``Σ r_i`` columns, never dense).

Sums are taken in float64 and cast back to the input dtype, so identical contributions come back
bit-identical.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .device import as_float64

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Contribution:
    weight: float  # FedAvg weight (the client's training samples); must be > 0
    tensors: dict[str, torch.Tensor]
    alpha: float  # LoRA alpha of this contributor (rank is read from lora_A's shape)


@dataclass
class Average:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # FedAvg'd full tensors and LoRA factors
    folds: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (B_stack, A_stack)

    def delta(self, module: str) -> torch.Tensor:
        """Dense ``ΔW_g = B_stack @ A_stack`` ([out, in], float32; matmul in float64)."""
        return fold_delta(*self.folds[module])


def fold_delta(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``B @ A`` multiplied in float64 on the CPU, returned in float32 on B's device: every party computes the
    same bits from the same factors, whatever device it trains on (a GPU matmul sums in another order)."""
    return (B.cpu().double() @ A.cpu().double()).float().to(B.device)


def lora_module(name: str) -> tuple[str, str] | None:
    """``"...q_proj.lora_A.weight"`` -> ``("...q_proj", "A")``; None for a tensor that is not a LoRA factor."""
    m = _LORA.match(name)
    return (m["module"], m["factor"]) if m else None


def _mean(name: str, xs: list[torch.Tensor], ws: list[float]) -> torch.Tensor:
    """``Σ w_i x_i / Σ w_i`` in float64, cast back to the first tensor's dtype and device."""
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise ValueError(f"cannot average {name!r}: shapes differ across contributors: {sorted(shapes)}")
    acc = torch.zeros_like(as_float64(xs[0]))
    for x, w in zip(xs, ws):
        acc += w * as_float64(x).to(acc.device)
    return (acc / sum(ws)).to(device=xs[0].device, dtype=xs[0].dtype)


def _stack(module: str, parts: list[tuple[float, float, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact average of products by stacking: ``(B_stack [out, Σr], A_stack [Σr, in])`` in float32."""
    total = sum(w for w, _, _, _ in parts)
    ins = {A.shape[1] for _, _, _, A in parts}
    outs = {B.shape[0] for _, _, B, _ in parts}
    if len(ins) > 1 or len(outs) > 1:
        raise ValueError(f"cannot average LoRA module {module!r}: in/out sizes differ: in {sorted(ins)}, out {sorted(outs)}")
    device = parts[0][3].device
    Bs = [(as_float64(B).to(device) * (w / total * alpha / A.shape[0])).float() for w, alpha, B, A in parts]
    As = [A.to(device=device, dtype=torch.float32) for _, _, _, A in parts]
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def average(contributions: list[Contribution]) -> Average:
    """FedAvg the contributions block-wise; LoRA modules of differing rank/alpha go to ``folds`` (exact)."""
    if not contributions:
        raise ValueError("nothing to average: no contributions")
    full: dict[str, list[tuple[float, torch.Tensor]]] = {}
    lora: dict[str, list[tuple[float, float, torch.Tensor, torch.Tensor]]] = {}
    for i, c in enumerate(contributions):
        if not (math.isfinite(c.weight) and c.weight > 0):
            raise ValueError(f"contribution {i} has weight {c.weight!r}; FedAvg weights must be finite and > 0")
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for name, x in c.tensors.items():
            if not torch.isfinite(x).all():
                raise ValueError(f"contribution {i}: tensor {name!r} holds NaN or Inf")
            lm = lora_module(name)
            if lm is None:
                full.setdefault(name, []).append((c.weight, x))
            else:
                factors.setdefault(lm[0], {})[lm[1]] = x
        for module, f in factors.items():
            if set(f) != {"A", "B"}:
                missing = "lora_B" if "A" in f else "lora_A"
                raise ValueError(f"contribution {i}: LoRA module {module!r} has no {missing}")
            A, B = f["A"], f["B"]
            if B.shape[1] != A.shape[0]:
                raise ValueError(f"contribution {i}: LoRA module {module!r}: lora_B {tuple(B.shape)} does not match lora_A {tuple(A.shape)}")
            lora.setdefault(module, []).append((c.weight, float(c.alpha), B, A))

    out = Average()
    for name, pairs in full.items():
        out.tensors[name] = _mean(name, [x for _, x in pairs], [w for w, _ in pairs])
    for module, parts in lora.items():
        ws = [w for w, _, _, _ in parts]
        if len({(A.shape[0], alpha) for _, alpha, _, A in parts}) == 1:
            out.tensors[f"{module}.lora_A.weight"] = _mean(f"{module}.lora_A.weight", [A for *_, A in parts], ws)
            out.tensors[f"{module}.lora_B.weight"] = _mean(f"{module}.lora_B.weight", [B for _, _, B, _ in parts], ws)
        else:
            out.folds[module] = _stack(module, parts)
    return out


@torch.no_grad()
def add_delta(weight: torch.Tensor, delta: torch.Tensor, fan_in_fan_out: bool) -> None:
    """In place: ``weight += delta`` (``delta`` is [out, in]; Conv1D weights are stored [in, out])."""
    if fan_in_fan_out:
        delta = delta.T
    if delta.shape != weight.shape:
        raise ValueError(f"cannot fold a {tuple(delta.shape)} update into a {tuple(weight.shape)} weight (fan_in_fan_out={fan_in_fan_out})")
    weight += delta.to(device=weight.device, dtype=weight.dtype)


def low_rank(delta: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-rank factors ``B [out, k]``, ``A [k, in]`` of ``delta`` by SVD (float64), ``k`` = numerical rank.

    Singular values above ``rtol * largest`` are kept and split as ``sqrt(S)`` into both factors, so
    they are balanced; a zero matrix gives ``k = 1`` with zero factors (LoRA needs rank ≥ 1).
    """
    U, S, Vh = torch.linalg.svd(as_float64(delta), full_matrices=False)
    k = int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    if k == 0:
        z = delta.new_zeros
        return z(delta.shape[0], 1), z(1, delta.shape[1])
    root = S[:k].sqrt()
    B, A = U[:, :k] * root, root[:, None] * Vh[:k]
    return B.to(device=delta.device, dtype=delta.dtype), A.to(device=delta.device, dtype=delta.dtype)
