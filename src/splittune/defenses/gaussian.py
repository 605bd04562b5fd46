"""Clipped Gaussian noise on the smashed activations the client sends (the Gaussian mechanism per token row)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from ..cut.transforms import ChainError, Crossing, End, _activation_like
from ..dpmath.accounting import gaussian_epsilon
from ..dpmath.mechanisms import clip_pullback, clip_rows, gaussian_noise
from .base import Defense, Guarantee, Settings, finite, register
from .noise import NoisyTransform


class GaussianDefense(Settings):
    """Clipped Gaussian noise on the smashed activations the client sends: each token's row clipped to L2 norm
    ``clip``, then N(0, (sigma·clip)²) per value; an RDP accountant composes it over every release."""

    name: Literal["gaussian"]
    sigma: float = Field(..., ge=0.0, description="noise multiplier: the noise std over the clip norm (0: clip only, no guarantee)")
    clip: float = Field(..., gt=0.0, description="L2 norm each token's activation row is clipped to")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="the δ of the reported (ε, δ)")


@register
class Gaussian(NoisyTransform, Defense):
    """Each token's activation row clipped to L2 norm ``clip``, plus N(0, (sigma·clip)²) per value, on every crossing
    of the smashed activations (training and evaluation: each is a release). The client's own backward goes
    through the clipping: the gradient that comes back for a micro-batch is pulled back through the clip's
    Jacobian (``End.pullbacks``), so training follows the function that was actually released."""

    name = "gaussian"
    Settings = GaussianDefense
    crosses = True

    def __init__(self, sigma: float, clip: float, delta: float = 1e-5, **rest):
        super().__init__()
        if rest:
            raise ChainError(f"transform 'gaussian' takes sigma, clip and delta, got {sorted(rest)}")
        if not (float(sigma) >= 0 and float(clip) > 0 and 0 < float(delta) < 1):
            raise ChainError(f"gaussian: needs sigma >= 0, clip > 0 and 0 < delta < 1, got sigma={sigma}, clip={clip}, delta={delta}")
        self.sigma, self.clip, self.delta = float(sigma), float(clip), float(delta)

    def spec(self):
        return {"name": self.name, "sigma": self.sigma, "clip": self.clip, "delta": self.delta}

    def varies(self, role, width):
        return "the gaussian defense draws new noise at every crossing" if role == "hidden" else None

    def send(self, crossing: Crossing, end: End) -> None:
        msg = crossing.msg
        x = msg.tensors.get("hidden")
        if x is None or not _activation_like("hidden", x):
            return
        clipped, scale = clip_rows(x, self.clip)
        noise = gaussian_noise(tuple(x.shape), self.sigma * self.clip, self.generator(msg.step, msg.micro)) if self.sigma > 0 else None
        msg.tensors["hidden"] = clipped if noise is None else (clipped.float() + noise.to(x.device)).to(x.dtype)
        if msg.step > 0:
            for key in [k for k in end.pullbacks if 0 < k[0] < msg.step]:  # replies that never came (a frozen bottom)
                del end.pullbacks[key]
            if bool((scale < 1).any()):
                end.pullbacks[(msg.step, msg.micro)] = lambda g, x=x, scale=scale: clip_pullback(x, scale.to(g.device), g)

    @classmethod
    def guarantee(cls, entry, usage):
        """Each release of a token's clipped row (sensitivity ``clip``, noise σ·clip) is the Gaussian mechanism; a
        training example is released every time it is in a batch, composed without subsampling amplification.
        ``epsilon_per_token`` protects one row; a token also shapes the rows after it (attention), so
        ``epsilon_per_example`` protects a whole example's rows at once (seq_len rows, sensitivity √seq_len·clip).
        Evaluation passes release the held-out examples and are reported on their own."""
        sigma, delta = entry["sigma"], entry["delta"]
        figures = {
            "delta": delta,
            "epsilon_per_token": finite(gaussian_epsilon(sigma, usage.releases, delta)),
            "epsilon_per_example": finite(gaussian_epsilon(sigma / math.sqrt(usage.seq_len), usage.releases, delta)),
            "eval_epsilon_per_token": finite(gaussian_epsilon(sigma, usage.eval_passes, delta)),
            "accountant": "opacus RDP, sampling rate 1 (no amplification)",
        }
        return Guarantee(figures, figures["epsilon_per_token"])

    @classmethod
    def sweep(cls, run, scale):
        """The clip at the median row norm; the noise std ½, 1 and 2 times the per-value signal (σ = k/√width)."""
        clip, width = round(scale["row_norm"], 4), scale["width"]
        return [(f"gaussian-{k:g}x", {"defense": [{"name": "gaussian", "sigma": round(k / math.sqrt(width), 5), "clip": clip}]})
                for k in (0.5, 1.0, 2.0)]
