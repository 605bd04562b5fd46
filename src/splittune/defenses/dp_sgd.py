"""DP-SGD on the client's adapters (Abadi et al. 2016): every training example's gradient of the client's LoRA
factors is clipped to ``max_grad_norm``, the clipped gradients are summed, Gaussian noise of std
``noise_multiplier × max_grad_norm`` is added, and the client's optimizer steps on that.

Per-example gradients come from hooks on the LoRA factors (plain ``nn.Linear`` layers): each forward of a factor
keeps its input and puts a hook on its output, and that output's gradient with the kept input gives every
example's weight gradient (``einsum``), so the pairing holds even when pipelined micro-batches interleave their
forwards and backwards. opacus' ``GradSampleModule`` pairs a module's activations and gradients in stack order
(the last forward with the first backward), which the pipelined split backward breaks; splittune therefore
computes per-example gradients itself and takes opacus' accountant for ε.

It protects the client's adapters: what the client exports or sends to an average. It does not touch the
activations that cross the cut, nor the server's adapters (docs/privacy.md shows the inversion attack unchanged).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from ..dpmath.accounting import gaussian_epsilon, most_releases, noise_for_epsilon
from ..errors import SplittuneError
from .base import Defense, Guarantee, Settings, finite, register
from .noise import NoiseStream


class DPError(SplittuneError, ValueError):
    """DP-SGD that cannot run on this client (names what trains that it cannot clip per example)."""


class DpSgdConfig(Settings):
    """DP-SGD on the client's adapters (Abadi et al. 2016): each example's gradient clipped to ``max_grad_norm``, summed,
    plus N(0, (noise_multiplier·max_grad_norm)²); it protects the adapters, not what crosses the cut."""

    noise_multiplier: float | None = Field(None, ge=0.0, description="noise std over max_grad_norm (give this or target_epsilon)")
    target_epsilon: float | None = Field(None, gt=0.0, description="the ε the run must stay within: the noise multiplier "
                                         "is found for the run's steps and sampling rate (opacus)")
    max_grad_norm: float = Field(1.0, gt=0.0, description="L2 norm each example's gradient of the client's adapters is clipped to")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="the δ of the reported (ε, δ)")

    @model_validator(mode="after")
    def _one_noise(self) -> "DpSgdConfig":
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("dp_sgd takes either noise_multiplier or target_epsilon (exactly one)")
        return self


def sample_rate(per_step: int, examples: int) -> float:
    return min(1.0, per_step / max(examples, 1))


@register
class DPSGD(Defense):
    name = "dp_sgd"
    Settings = DpSgdConfig
    key = "dp_sgd"

    def __init__(self, party, noise_multiplier: float, max_grad_norm: float, secret: int):
        if party.router is not None:
            raise DPError("dp_sgd clips each example's gradient, and this model's router loss ties the examples of a batch "
                          "together (its load balancing is a product of sums over every row); set output_router_logits "
                          "to false in the model's config.json to use dp_sgd")
        self.sigma, self.clip = float(noise_multiplier), float(max_grad_norm)
        self.noise = NoiseStream(secret, "dp_sgd")
        self.steps = 0  # optimizer steps taken: the key of each step's noise, as many in-process as deployed
        owners = {id(m.weight): m for m in party.model.modules() if isinstance(m, nn.Linear) and m.bias is None}
        self.params: list[tuple[str, nn.Parameter]] = []
        for name, p in party.trained():
            if id(p) not in owners:
                raise DPError(f"dp_sgd clips per-example gradients of LoRA factors, and {name} is another trained weight "
                              "(a segment with full training); set every client segment to lora or frozen")
            self.params.append((name, p))
        self.modules = [owners[id(p)] for _, p in self.params]
        self.offset = 0  # the first example of the micro-batch whose forward runs now
        self.samples = 0
        self.grads: dict[int, torch.Tensor] = {}  # id(param) -> [examples, *shape] for this step
        self._handles = [m.register_forward_hook(self._forward) for m in self.modules]

    @classmethod
    def check(cls, settings, run):
        if run.mode == "centralized":
            raise ValueError("dp_sgd protects the client's adapters from the server and the other clients; mode: "
                             "centralized shares nothing (use mode: split or federated)")
        if run.scales_loss:
            raise ValueError("dp_sgd clips each example's gradient, and a float16 run scales every gradient by its loss "
                             "scale; compute in bfloat16 (train.autocast: bfloat16) or float32 with dp_sgd")
        if run.train.gradient_checkpointing:
            raise ValueError("dp_sgd takes per-example gradients from the forward it saw, and train.gradient_checkpointing "
                             "runs the blocks again in backward; turn one of them off")

    @classmethod
    def create(cls, settings, at):
        return cls(at.party, cls.noise(settings, at.examples, at.steps, at.per_step), settings.max_grad_norm, at.secret)

    @staticmethod
    def noise(settings: DpSgdConfig, examples: int, steps: int, per_step: int) -> float:
        """The noise multiplier: as given, or the smallest that keeps both of the run's ε (``guarantee``: at this
        client's sampling rate over ``steps``, and unamplified over the steps an example is in) within
        ``target_epsilon`` (opacus' RDP search)."""
        if settings.noise_multiplier is not None:
            return settings.noise_multiplier
        eps, delta = settings.target_epsilon, settings.delta
        releases = most_releases(examples, per_step, steps)
        return max(noise_for_epsilon(eps, steps, delta, sample_rate=sample_rate(per_step, examples)),
                   noise_for_epsilon(eps, releases, delta))

    def resolved(self):
        return {"noise_multiplier": self.sigma}

    @classmethod
    def guarantee(cls, entry: dict[str, Any], usage):
        """Each step is a subsampled Gaussian mechanism on the clipped per-example gradients of the client's adapters;
        ``epsilon`` uses the sampling rate (opacus' convention, which assumes Poisson sampling) and
        ``epsilon_without_amplification`` composes only the steps an example was in, which holds for shuffled epochs;
        the headline is the larger: it holds whichever sampling applies."""
        sigma, delta = entry["noise_multiplier"], entry["delta"]
        figures = {**entry, "sample_rate": usage.sample_rate, "steps": usage.steps,
                   "epsilon": finite(gaussian_epsilon(sigma, usage.steps, delta, sample_rate=usage.sample_rate)),
                   "epsilon_without_amplification": finite(gaussian_epsilon(sigma, usage.releases, delta)),
                   "accountant": "opacus RDP at the sampling rate (it assumes Poisson sampling; batches here are shuffled "
                                 "epochs, for which epsilon_without_amplification is the bound that holds)"}
        bounds = [figures["epsilon"], figures["epsilon_without_amplification"]]
        return Guarantee(figures, None if None in bounds else max(bounds))

    # -- the client's step --
    def begin(self, samples: int) -> None:
        self.samples, self.grads = samples, {}

    def at(self, offset: int) -> None:
        self.offset = offset

    def _forward(self, module: nn.Linear, args, output: torch.Tensor) -> None:
        if not output.requires_grad:
            return
        x, offset = args[0].detach(), self.offset

        def backward(g: torch.Tensor) -> None:
            rows = torch.einsum("b...o,b...i->boi", g.detach().float(), x.float())  # per-example dW
            held = self.grads.setdefault(id(module.weight), torch.zeros((self.samples, *module.weight.shape)))
            held[offset:offset + rows.shape[0]] += rows.cpu()

        output.register_hook(backward)

    def before_optimizer(self) -> None:
        self.privatise()

    def privatise(self) -> dict[str, float]:
        """Replace the step's gradients by their clipped per-example sum plus noise, over the examples (each
        example's gradient taken as ``examples ×`` its share, so that the mean of them is the step's gradient)."""
        per = [self.grads.get(id(p), torch.zeros((self.samples, *p.shape))) * self.samples for _, p in self.params]
        norms = torch.sqrt(sum((g.flatten(1).double() ** 2).sum(1) for g in per))
        scale = torch.clamp(self.clip / norms.clamp_min(1e-12), max=1.0)
        self.steps += 1
        generator = self.noise.draw(self.steps)
        for (_, p), g in zip(self.params, per):
            clipped = (g.double() * scale.view(-1, *[1] * (g.dim() - 1))).sum(0)
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64) * (self.sigma * self.clip)
            p.grad = ((clipped + noise) / self.samples).to(p.dtype).to(p.device)
        self.grads = {}
        return {"clipped": float((norms > self.clip).double().mean()), "grad_norm_median": float(norms.median())}

    def per_example(self) -> dict[str, torch.Tensor]:
        """This step's per-example gradients by name (before ``privatise``), for checks."""
        return {name: self.grads.get(id(p), torch.zeros((self.samples, *p.shape))) for name, p in self.params}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"steps": torch.tensor([self.steps], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "steps" in state:
            self.steps = int(state["steps"][0])

    def close(self) -> None:
        for h in self._handles:
            h.remove()
