"""DP-Forward: the analytic matrix Gaussian mechanism on a bottom sub-layer's output, with its (ε, δ)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator

from ..dpmath.accounting import gaussian_epsilon
from ..dpmath.mechanisms import analytic_gaussian_epsilon, analytic_gaussian_sigma, clip_matrices, clip_rows, gaussian_noise
from .base import Defense, DefenseError, Guarantee, Settings, finite, register
from .noise import DrawsNoise, NoiseStream


class DpForwardDefense(Settings):
    """DP-Forward (Du et al., CCS'23): each example's matrix of hidden rows at a chosen bottom sub-layer clipped, then
    i.i.d. Gaussian noise calibrated by the analytic Gaussian mechanism for (``epsilon``, ``delta``) per release."""

    name: Literal["dp-forward"]
    epsilon: float = Field(..., gt=0.0, description="ε of each release of one example (sequence-level local DP); inf: off")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="δ of each release")
    clip: float = Field(..., gt=0.0, description="norm bound: of each example's matrix (frobenius) or of each token's row (row)")
    norm: Literal["frobenius", "row"] = Field(
        "frobenius", description="frobenius: the example's [tokens, width] matrix clipped to Frobenius norm clip "
        "(sensitivity 2·clip); row: each token's row clipped to clip (sensitivity 2·clip·√tokens)")
    at: int | Literal["embeddings", "last"] = Field(
        "last", description="the sub-layer whose output is noised: last (the last client block before the cut: what "
        "crosses), embeddings (the token embeddings), or a block index k below the first cut (block k's output)")

    @field_validator("at", mode="before")
    @classmethod
    def _sub_layer(cls, value):
        if value in ("last", "embeddings") or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError(f"must be last, embeddings or a block index (an integer >= 0), got {value!r}")


@register
class DpForward(DrawsNoise, Defense):
    """DP-Forward (Du, Yue, Chow, Wang, Huang, Sun: "DP-Forward: Fine-tuning and Inference on Language Models with
    Differential Privacy in Forward Pass", CCS 2023): the output of a chosen sub-layer of the client's bottom is
    normalised and perturbed with matrix Gaussian noise, so everything after it, what crosses the cut included, is
    post-processing of an (ε, δ)-DP release of the example, at training and at inference alike.

    Departures from the paper: (1) the noise is i.i.d. N(0, σ²) per value, the aMGM with Σ = σI, Ψ = I, where the
    aMGM's condition is exactly the analytic Gaussian mechanism (Balle & Wang 2018) on the Frobenius sensitivity;
    the paper's search for non-i.i.d. row and column covariances is not done. (2) The sub-layers are a block's
    output (the residual stream between blocks) or the token embeddings, not the paper's finer points inside a
    block. (3) Padding rows are clipped and noised with the rest. The client's backward runs through the clip
    (it is in its autograd graph); the noise is drawn from its secret (``noise.py``)."""

    name = "dp-forward"
    Settings = DpForwardDefense

    def __init__(self, settings: DpForwardDefense, block: torch.nn.Module | None, secret: int):
        self.epsilon, self.delta, self.clip, self.norm = float(settings.epsilon), float(settings.delta), float(settings.clip), settings.norm
        self.unit = analytic_gaussian_sigma(self.epsilon, self.delta, 1.0)  # σ per unit of sensitivity
        self.noise = NoiseStream(secret, "dp-forward")
        self.block = block  # the block whose input is noised; None: the embedding output
        self.armed: tuple[int, int] | None = None  # the (step, micro) of the bottom forward now running
        self.handle = None
        if block is not None and self.active:
            self.handle = block.register_forward_pre_hook(self._entering, with_kwargs=True)

    @classmethod
    def check(cls, settings, run):
        if isinstance(settings.at, int) and run.cuts and settings.at >= run.cuts[0]:
            raise ValueError(f"defense: dp-forward at: {settings.at} is not a block of the client's bottom (cuts={run.cuts}: "
                             f"blocks 0 to {run.cuts[0] - 1}); use a block index below the first cut, last or embeddings")

    @classmethod
    def create(cls, settings, at):
        party = at.party
        blocks = getattr(party, "blocks", None)
        if blocks is None:  # a stand-in holding a public bottom: its blocks where its spec says they are
            base = party.model.get_base_model() if hasattr(party.model, "get_base_model") else party.model
            blocks = base.get_submodule(party.spec.blocks_path)
        # the first block this party holds no weights of is where its bottom ends (the cut)
        cut = next((i for i, b in enumerate(blocks) if not any(True for _ in b.parameters())), len(blocks))
        if settings.at == "embeddings":
            block = None
        elif settings.at == "last":
            block = cut
        elif 0 <= settings.at < cut:
            block = settings.at + 1
        else:
            raise DefenseError(f"defense dp-forward: at: {settings.at} is not a block of the client's bottom (blocks 0 to "
                               f"{cut - 1} before the cut at {cut}); use a block index in that range, last or embeddings")
        return cls(settings, None if block is None else blocks[block], at.secret)

    @property
    def active(self):
        return not math.isinf(self.epsilon)

    def sigma(self, tokens: int) -> float:
        """The noise std for examples of ``tokens`` rows: σ per unit × the L2 sensitivity of one example."""
        sensitivity = 2 * self.clip * (math.sqrt(tokens) if self.norm == "row" else 1.0)
        return self.unit * sensitivity

    def release(self, x: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """``x`` [batch, tokens, width] clipped and noised (the mechanism itself)."""
        clipped = clip_rows(x, self.clip)[0] if self.norm == "row" else clip_matrices(x, self.clip)
        noise = gaussian_noise(tuple(x.shape), self.sigma(x.shape[-2]), self.noise.draw(step, micro))
        return (clipped.float() + noise.to(x.device)).to(x.dtype)

    def embeddings(self, embeds, step, micro):
        """At the embeddings: the release itself. At a block: arm its hook for this forward (whoever runs the bottom
        through the defenses' embedding hook, the client or an attacker's replay, gets the block noised too)."""
        if self.block is None:
            return self.release(embeds, step, micro)
        self.armed = (step, micro)
        return embeds

    def _entering(self, module, args, kwargs):
        if self.armed is None:  # a forward without the defenses (the top's, an undefended evaluation)
            return None
        (step, micro), self.armed = self.armed, None
        hidden = self.release(args[0] if args else kwargs["hidden_states"], step, micro)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    def close(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def varies_bottom(self):
        return "the dp-forward defense draws new noise in the bottom at every forward"

    def resolved(self):
        return {"sigma_per_sensitivity": self.unit}

    @classmethod
    def guarantee(cls, entry, usage):
        """(ε, δ) per release of one example (sequence-level: any two examples, neighbours by replacement); the
        noise σ/Δ of a release composed over every release of an example by the RDP accountant, and over the
        evaluation passes on their own."""
        eps, delta = entry["epsilon"], entry["delta"]
        if math.isinf(eps):
            return Guarantee({"epsilon": None, "delta": delta}, None)
        unit = entry.get("sigma_per_sensitivity") or analytic_gaussian_sigma(eps, delta, 1.0)
        figures = {"epsilon": eps, "delta": delta, "sigma_per_sensitivity": unit, "norm": entry["norm"], "at": entry["at"],
                   "epsilon_all_releases": finite(gaussian_epsilon(unit, usage.releases, delta)),
                   "eval_epsilon": finite(gaussian_epsilon(unit, usage.eval_passes, delta)),
                   "calibration": "analytic Gaussian (Balle & Wang 2018), i.i.d. matrix noise"}
        return Guarantee(figures, eps)

    @classmethod
    def sweep(cls, run, scale):
        """The example's matrix clipped at the median row norm × √seq_len (frobenius), and the ε whose noise std is ½,
        1 and 2 times the per-value signal (row norm / √width): the ε it takes, however large, is what is reported."""
        seq = run.train.seq_len
        clip = round(scale["row_norm"] * math.sqrt(seq), 4)
        out = []
        for k in (0.5, 1.0, 2.0):
            per_unit = k * scale["row_norm"] / math.sqrt(scale["width"]) / (2 * clip)  # σ / Δ
            eps = float(f"{analytic_gaussian_epsilon(per_unit, 1e-5):.4g}")
            out.append((f"dp-forward-{k:g}x", {"defense": [{"name": "dp-forward", "epsilon": eps, "clip": clip}]}))
        return out
