"""The router's auxiliary (load-balancing) loss of mixture-of-experts models, computed across a split.

With ``output_router_logits`` on, transformers adds ``coef · aux`` to the loss, where ``aux`` (Switch
Transformer's load balancing, ``load_balancing_loss_func``) is

    aux = E · Σ_e (T_e / N) · (R_e / N)

over *every* layer's router: T_e counts the real tokens routed to expert e (top-k), R_e sums their
routing probabilities, N counts real tokens once per layer. A product of sums over all layers is not a
sum of per-party terms, so each party that runs routers sends its sums (``[rows, 2E + 1]``: T, R, N per
row, R differentiable) with its activations; the party that ends the model adds them up, computes the
loss exactly as the unsplit model does, and returns the sums' gradient (``E · T / N²`` times the
coefficient) with the activations' gradient. The sums are E + 1 numbers per row and layer group: what
they reveal (how a party's tokens spread over experts) is stated in docs/privacy.md.

Evaluation losses (perplexity) are the language-model loss alone, on every kind of run.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .arch import ArchitectureError
from .absent import AbsentBlock

ROUTER = "router"  # the tensor that carries a party's sums across the cut


class RoutingError(ArchitectureError):
    """A mixture-of-experts model whose auxiliary loss splittune cannot split exactly."""


@dataclass
class RouterAux:
    """One party's routers and what the model's auxiliary loss needs to know."""

    routers: list[nn.Module]  # the router modules of the blocks this party holds
    index: int  # which output of a router is its logits
    experts: int
    top_k: int
    coef: float

    @classmethod
    def of(cls, model: nn.Module, blocks: nn.ModuleList) -> "RouterAux | None":
        """The auxiliary loss of ``model`` (the unwrapped causal LM), or None when it computes none."""
        config = model.config
        if not getattr(config, "output_router_logits", False):
            return None
        recorder = getattr(model, "_can_record_outputs", {}).get("router_logits")
        reference = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
        name = type(model).__name__
        if recorder is None or reference is None or not hasattr(model, "router_aux_loss_coef"):
            raise RoutingError(f"{name} computes a router loss (output_router_logits: true) in a way splittune does not split; "
                               "set output_router_logits to false in the model's config.json to train without it")
        target, layer = getattr(recorder, "target_class", None), getattr(recorder, "layer_name", None)
        routers = [m for b in blocks if not isinstance(b, AbsentBlock) for n, m in b.named_modules()
                   if (target is None or isinstance(m, target)) and (layer is None or n.endswith(layer))]
        aux = cls(routers, int(getattr(recorder, "index", 0) or 0), int(model.num_experts), int(model.num_experts_per_tok),
                  float(model.router_aux_loss_coef))
        aux._check(reference, name)
        return aux

    def _check(self, reference, name: str) -> None:
        """The model's own function and these sums must agree (on random logits): a family that balances its
        experts otherwise is refused, never trained with a wrong loss."""
        g = torch.Generator().manual_seed(0)
        logits = tuple(torch.randn(2 * 5, self.experts, generator=g) for _ in range(3))
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[0, :2] = 0
        want = reference(logits, self.experts, self.top_k, mask)
        got = self.loss(sum(self.row_sums(layer, mask) for layer in logits))
        if not torch.allclose(torch.as_tensor(want, dtype=torch.float32), got, rtol=1e-5, atol=1e-6):
            raise RoutingError(f"{name}'s router loss is not Switch load balancing over top-{self.top_k} of {self.experts} "
                               "experts; splittune cannot split it exactly (set output_router_logits to false in config.json)")

    def row_sums(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One router's logits ([rows·seq, E]) as per-row sums [rows, 2E + 1]: tokens per expert, probabilities, N
        (the reductions of transformers' ``load_balancing_loss_func``, kept per row)."""
        rows, seq = mask.shape
        weights = torch.softmax(logits, dim=-1)
        _, chosen = torch.topk(weights, self.top_k, dim=-1)
        real = mask.reshape(-1, 1).to(torch.float32)
        counts = torch.zeros(rows * seq, self.experts, dtype=torch.float32, device=logits.device)
        counts.scatter_add_(1, chosen, real.expand(-1, self.top_k).contiguous())
        probs = weights.float() * real
        return torch.cat([counts.view(rows, seq, -1).sum(1), probs.view(rows, seq, -1).sum(1), real.view(rows, seq).sum(1, keepdim=True)], 1)

    def loss(self, sums: torch.Tensor) -> torch.Tensor:
        """``aux`` from the sums of every party ([rows, 2E + 1] or already summed over rows)."""
        total = sums.reshape(-1, 2 * self.experts + 1).sum(0)
        tokens, probs, n = total[: self.experts], total[self.experts: 2 * self.experts], total[-1]
        return (tokens.detach() / n.detach() * (probs / n.detach())).sum() * self.experts

    @contextlib.contextmanager
    def collect(self, mask: torch.Tensor):
        """Record this party's routers during one segment run; the box holds their summed rows (None if none ran).

        The hooks only keep the logits; the sums are taken after the run, outside the blocks: under activation
        recomputation a block's backward reruns it without these hooks, and it must save what its forward saved."""
        logits: list[torch.Tensor] = []
        box: dict[str, torch.Tensor | None] = {"sums": None}

        def hook(module, args, output):
            logits.append(output[self.index] if isinstance(output, tuple) else output)

        handles = [r.register_forward_hook(hook) for r in self.routers]
        try:
            yield box
        finally:
            for h in handles:
                h.remove()
        for layer in logits:
            sums = self.row_sums(layer, mask)
            box["sums"] = sums if box["sums"] is None else box["sums"] + sums

    def add(self, loss: torch.Tensor, *parts: torch.Tensor | None) -> torch.Tensor:
        """``loss`` plus the auxiliary term over every party's sums (the ones given; None: a party ran no router)."""
        given = [p for p in parts if p is not None]
        if not given:
            return loss
        return loss + self.coef * self.loss(torch.cat([p.to(loss.device) for p in given])).to(loss.device)
