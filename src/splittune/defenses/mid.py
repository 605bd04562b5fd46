"""MID: a variational information bottleneck on the activations the client sends, trained with the task.

Zou et al., "Mutual Information Regularization for Vertical Federated Learning" (MID; arXiv 2301.01142), as
VFLAIR-LLM (KDD'25) applies it to split LLM fine-tuning: the client encodes each token's activation h into a
Gaussian (μ, log σ²), samples z = μ + σ·ε, and sends a decoding of z; β × KL(N(μ, σ²) ‖ N(0, I)) on the client's
loss bounds the mutual information between what it holds and what it sends.

Where this departs from the paper, plainly:

- the encoder and decoder are single linear maps (the paper's and VFLAIR's are small MLPs), applied per token to
  the row divided by its RMS (its scale passes through: the decoding is multiplied back by it), so that the prior's
  unit variance means the same on every model. They start as the identity (a random orthonormal projection when
  ``width`` is below the model's) with noise ``init`` times the row's RMS: training begins near the undefended run;
- the KL is the mean over bottleneck dimensions and over the micro-batch's sent tokens (β does not scale with the
  width); with ``train.micro_batches: m`` each micro-batch adds its own mean, so the step's weight is m·β;
- it runs in the chain's defense slot on the client's sending end (so an attacker replays it as announced: the
  bottleneck at its public initialisation, with its own noise) and trains with its own Adam of rate ``lr`` outside
  the run's optimizer (no global gradient-norm clipping, no LR schedule), stepped before the next crossing; its
  weights stay with the client (checkpointed with the chain, never sent, not in the exported adapter), so split
  generation, which builds its chain afresh, samples the bottleneck at its initialisation, not the trained one.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..cut.transforms import ChainError, Crossing, End, _activation_like
from .base import Defense, Guarantee, Settings, register
from .noise import NoisyTransform
from .trainable import Trained


class MidDefense(Settings):
    """MID (Zou et al. 2023; VFLAIR-LLM): a variational information bottleneck on the activations the client sends,
    trained with the task under β × KL to a standard normal."""

    name: Literal["mid"]
    beta: float = Field(..., ge=0.0, description="weight of the KL term on the client's loss (0: off, the bottleneck is skipped)")
    width: int | None = Field(None, ge=1, description="bottleneck width (null: the model's hidden size)")
    init: float = Field(0.1, gt=0.0, description="the noise std the bottleneck starts with, over each row's RMS")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the bottleneck's encoder and decoder")


class Bottleneck(nn.Module):
    """Per token: x = h / rms(h); μ = A x, log σ² = S x + s; z = μ + σ ε; out = rms(h) · D z."""

    def __init__(self, model_width: int, width: int, init: float):
        super().__init__()
        self.mu = nn.Linear(model_width, width)
        self.logvar = nn.Linear(model_width, width)
        self.dec = nn.Linear(width, model_width)
        with torch.no_grad():
            if width == model_width:
                basis = torch.eye(width)
            else:  # a public, seeded orthonormal projection (an attacker builds the same)
                q, _ = torch.linalg.qr(torch.randn(model_width, width, generator=torch.Generator().manual_seed(0)))
                basis = q.T.contiguous()
            self.mu.weight.copy_(basis)
            self.dec.weight.copy_(basis.T)
            for layer in (self.mu, self.dec, self.logvar):
                layer.bias.zero_()
            self.logvar.weight.zero_()
            self.logvar.bias.fill_(2 * math.log(init))

    def forward(self, h: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded sample and each token's KL (mean over the bottleneck's dimensions)."""
        rms = h.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
        x = h / rms
        mu, logvar = self.mu(x), self.logvar(x)
        z = mu + (0.5 * logvar).exp() * noise
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(-1)
        return self.dec(z) * rms, kl


@register
class Mid(NoisyTransform, Defense):
    """The bottleneck in the chain's defense slot: every crossing of the bottom's activations (training and
    evaluation) is a sample. A training crossing keeps its graph; the gradient that comes back for it is pulled
    through the bottleneck (``End.pullbacks``) together with β·KL, which trains the bottom and the bottleneck alike."""

    name = "mid"
    Settings = MidDefense
    crosses = True

    def __init__(self, beta: float, width: int | None = None, init: float = 0.1, lr: float = 1e-3, **rest):
        super().__init__()
        if rest:
            raise ChainError(f"transform 'mid' takes beta, width, init and lr, got {sorted(rest)}")
        if not (float(beta) >= 0 and float(init) > 0 and float(lr) > 0 and (width is None or int(width) >= 1)):
            raise ChainError(f"mid: needs beta >= 0, init > 0, lr > 0 and width >= 1 or null, got beta={beta}, "
                             f"init={init}, lr={lr}, width={width}")
        self.beta, self.width, self.init, self.lr = float(beta), None if width is None else int(width), float(init), float(lr)
        self.trained: Trained | None = None  # built at the first crossing (the model's width), on the sending end only
        self._grads_of = 0  # the training step whose gradients the bottleneck holds, not yet applied

    def spec(self):
        return {"name": self.name, "beta": self.beta, "width": self.width, "init": self.init, "lr": self.lr}

    def varies(self, role, width):
        return "the mid defense samples its bottleneck at every crossing" if role == "hidden" and self.beta > 0 else None

    def _build(self, model_width: int) -> Trained:
        if self.trained is None:
            self.trained = Trained(Bottleneck(model_width, self.width or model_width, self.init), self.lr)
        return self.trained

    def _apply_pending(self, step: int) -> None:
        """The previous step's update, once its every gradient has come back (a crossing of another step starts)."""
        if self.trained is not None and self._grads_of and self._grads_of != step:
            self.trained.step()
            self._grads_of = 0

    def send(self, crossing: Crossing, end: End) -> None:
        msg = crossing.msg
        x = msg.tensors.get("hidden")
        if self.beta == 0 or x is None or not _activation_like("hidden", x):
            return
        trained = self._build(x.shape[-1])
        trained.to(x.device)
        self._apply_pending(msg.step)
        noise = torch.randn((*x.shape[:-1], trained.module.mu.out_features), generator=self.generator(msg.step, msg.micro))
        if msg.step == 0:  # an evaluation: nothing comes back
            with torch.no_grad():
                out, _ = trained.module(x.float(), noise.to(x.device))
            msg.tensors["hidden"] = out.to(x.dtype)
            return
        h = x.detach().float().requires_grad_(True)
        with torch.enable_grad():
            out, kl = trained.module(h, noise.to(x.device))
            keep = crossing.hints.get("cut.keep", msg.tensors.get("attention_mask"))
            keep = torch.ones(kl.shape, dtype=torch.bool, device=kl.device) if keep is None else keep.bool().to(kl.device)
            if "cut.rows" in crossing.hints:  # the activation cache sent only these rows (off with mid: kept for safety)
                keep = keep[crossing.hints["cut.rows"].to(kl.device)]
            term = self.beta * kl[keep].mean()
        msg.tensors["hidden"] = out.detach().to(x.dtype)
        for key in [k for k in end.pullbacks if 0 < k[0] < msg.step]:  # replies that never came
            del end.pullbacks[key]

        def pullback(g: torch.Tensor, h=h, out=out, term=term, step=msg.step) -> torch.Tensor:
            torch.autograd.backward([out, term], [g.to(out.device, out.dtype), torch.ones_like(term)])
            self._grads_of = step
            return h.grad.to(g.device, g.dtype)

        end.pullbacks[(msg.step, msg.micro)] = pullback

    def state_dict(self):
        out = super().state_dict()
        if self.trained is not None:
            self._apply_pending(-1)  # a checkpoint after a step holds that step's update (applied now, not later)
            out.update({f"mid.{k}": v for k, v in self.trained.state_dict().items()})
        return out

    def load_state_dict(self, state):
        super().load_state_dict(state)
        mine = {k[4:]: v for k, v in state.items() if k.startswith("mid.")}
        if mine and self.stream is not None:
            self._build(mine["w.mu.weight"].shape[1]).load_state_dict(mine)

    @classmethod
    def check(cls, settings, run):
        if settings.beta > 0 and (run.segments.bottom == "frozen" or (isinstance(run.cuts, list) and run.cuts and run.cuts[0] == 0)):
            raise ValueError("defense mid trains its bottleneck with the gradient that comes back for the bottom's "
                             "activations, and this bottom trains nothing (cut 0, or segments.bottom: frozen); give the "
                             "bottom blocks to train (a first cut >= 1 with lora or full)")
        if settings.beta > 0 and run.scales_loss:
            raise ValueError("defense mid adds its KL term to gradients a float16 run scales by its loss scale; compute "
                             "in bfloat16 (train.autocast: bfloat16) or float32 with mid")

    @classmethod
    def guarantee(cls, entry, usage):
        return Guarantee({"beta": entry["beta"], "width": entry["width"], "init": entry["init"]}, has_epsilon=False)

    @classmethod
    def sweep(cls, run, scale):
        """Three KL weights, when the bottom trains (the bottleneck learns from the gradient that comes back for it)."""
        if run.segments.bottom == "frozen" or (run.cuts or [0])[0] == 0:
            return []
        return [(f"mid-{b:g}", {"defense": [{"name": "mid", "beta": b}]}) for b in (0.01, 0.1, 1.0)]
