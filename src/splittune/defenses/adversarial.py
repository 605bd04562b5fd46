"""Adversarial training of the client's bottom against an inverter it simulates and trains alongside (min–max).

The defense VFLAIR-LLM lists as adversarial training (AT), after Li et al., "ResSFL: A Resistance Transfer Framework
for Defending Model Inversion Attack in Split Federated Learning" (CVPR 2022) and Xiao et al., "Adversarial Learning
of Privacy-Preserving and Task-Oriented Representations" (AAAI 2020): at every training step the client fits an
inverter to its own sent activations (token ids as targets) and adds −weight × that inverter's loss to its own,
so the bottom learns activations the inverter cannot read while the task still can.

Where this departs from the papers, plainly:

- the simulated inverter is the learned attack's linear inverter (``privacy/attacks/inversion.py``, ``model:
  linear, head: embedding``): a linear map into embedding space, cosine logits against the public embedding table
  with a learned scale, started at its least-squares solution on the client's first micro-batch; it takes one Adam
  step (rate ``lr``) per training step on the step's micro-batches, after the client's term used it (alternating
  updates, no inner loop);
- the client's term is −weight × the inverter's per-token cross-entropy capped at log(vocabulary) (a uniform
  guess), averaged over the sent tokens: the bottom gains nothing from making the inverter worse than chance, and
  the min–max cannot diverge by inflating that loss without bound;
- the inverter is never sent and never averaged; it lives in the client's checkpoint (``Trained``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from .base import Defense, DefenseError, Guarantee, Settings, register
from .trainable import Trained


class AdversarialDefense(Settings):
    """Adversarial training (VFLAIR-LLM's AT; ResSFL, Li et al. 2022): the client's loss adds −weight × the loss of an
    inverter it trains alongside on its own sent activations."""

    name: Literal["adversarial"]
    weight: float = Field(..., ge=0.0, description="weight λ of the inverter's (negated) loss on the client's loss (0: off)")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the simulated inverter")


class LinearInverter(nn.Module):
    """Token logits from activations: a linear map into embedding space, cosine against the embedding table."""

    def __init__(self, width: int, table: torch.Tensor):
        super().__init__()
        self.map = nn.Linear(width, table.shape[1])
        self.log_scale = nn.Parameter(torch.tensor(math.log(30.0)))
        self.register_buffer("table", F.normalize(table.detach().float(), dim=-1), persistent=False)
        self.register_buffer("fitted", torch.zeros(1, dtype=torch.bool))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * F.normalize(self.map(hidden), dim=-1) @ self.table.T

    @torch.no_grad()
    def fit(self, hidden: torch.Tensor, ids: torch.Tensor) -> None:
        """The map by ridge least squares: activation -> its token's unit embedding (the attack's own start; the ridge,
        1% of the mean feature energy, keeps it from interpolating a micro-batch with fewer tokens than features)."""
        x = torch.cat([hidden, torch.ones(hidden.shape[0], 1, device=hidden.device)], 1).double().cpu()
        gram = x.T @ x
        ridge = 1e-2 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        solution = torch.linalg.solve(gram + ridge, x.T @ self.table[ids].double().cpu()).float()
        self.map.weight.copy_(solution[:-1].T)
        self.map.bias.copy_(solution[-1])
        self.fitted.fill_(True)


@register
class Adversarial(Defense):
    name = "adversarial"
    Settings = AdversarialDefense

    def __init__(self, settings: AdversarialDefense, table: torch.Tensor, width: int):
        self.weight = float(settings.weight)
        self.inverter = LinearInverter(width, table).to(table.device)
        self.trained = Trained(self.inverter, settings.lr)
        self.cap = math.log(table.shape[0])
        self._ids: torch.Tensor | None = None
        self._inverter_loss: list[float] = []

    @classmethod
    def create(cls, settings, at):
        if settings.weight > 0 and not at.party.trains(at.party.plan.segment("bottom")):
            raise DefenseError("defense adversarial trains the client's bottom against an inverter, and this bottom trains "
                               "nothing (cut 0, or segments.bottom: frozen); give the bottom blocks to train (a first cut "
                               ">= 1 with lora or full)")
        table = at.party.model.get_input_embeddings().weight
        return cls(settings, table, at.party.model.config.get_text_config().hidden_size)

    @property
    def active(self):
        return self.weight > 0

    def inputs(self, ids):
        self._ids = ids

    def penalty(self, embeds, hidden, mask, share):
        """Trains the inverter on the micro-batch (its gradient, weighted by ``share``) and returns −weight × its
        capped loss on the same activations, through the bottom only."""
        ids, self._ids = self._ids, None
        if ids is None or not hidden.requires_grad:
            return None
        keep = mask.bool().to(hidden.device)
        rows, targets = hidden[keep].float(), ids.to(hidden.device)[keep]
        inverter = self.inverter
        if not bool(inverter.fitted[0]):
            inverter.fit(rows.detach(), targets)
        own = F.cross_entropy(inverter(rows.detach()), targets)
        (share * own).backward()  # the inverter's gradient for this step (its own parameters only)
        self._inverter_loss.append(float(own.detach()) * share)
        frozen = {n: p.detach() for n, p in inverter.named_parameters()}
        ce = F.cross_entropy(functional_call(inverter, frozen, (rows,)), targets, reduction="none")
        return -self.weight * share * ce.clamp(max=self.cap).mean()

    def before_optimizer(self):
        self.trained.step()

    def figures(self, penalty):
        """The step's inverter loss on its own activations (before its update), for the metrics row."""
        out = {"adversarial_inverter_loss": round(sum(self._inverter_loss), 6)} if self._inverter_loss else {}
        self._inverter_loss = []
        return out

    def state_dict(self):
        return self.trained.state_dict()

    def load_state_dict(self, state):
        self.trained.load_state_dict(state)

    @classmethod
    def guarantee(cls, entry, usage):
        losses = [m["adversarial_inverter_loss"] for m in usage.metrics if "adversarial_inverter_loss" in m]
        return Guarantee({"weight": entry["weight"], "inverter_loss_first": losses[0] if losses else None,
                          "inverter_loss_last": losses[-1] if losses else None}, has_epsilon=False)

    @classmethod
    def sweep(cls, run, scale):
        """Three weights, when the bottom trains."""
        if run.segments.bottom == "frozen" or (run.cuts or [0])[0] == 0:
            return []
        return [(f"adversarial-{w:g}", {"defense": [{"name": "adversarial", "weight": w}]}) for w in (0.1, 0.3, 1.0)]
