"""The noise and the statistics the defenses are made of, as pure math on tensors (a leaf: the chain's defense
transforms and the client's defenses call it; nothing here knows a party or a message).

Noise is drawn on the CPU from a ``torch.Generator`` the caller owns and then moved, so the same seed gives the
same noise on every device, and the generator's state can be checkpointed for an exact resume.
"""

from __future__ import annotations

import numpy as np
import torch


def clip_rows(x: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row (last dimension) scaled to L2 norm at most ``clip``; returns the clipped rows and the scale
    min(1, clip/‖row‖) of each (1 exactly where a row is short enough, so such rows keep their bits)."""
    norms = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
    scale = torch.where(norms > clip, clip / norms.clamp_min(1e-30), torch.ones_like(norms))
    return (x.float() * scale).to(x.dtype), scale


def clip_pullback(x: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The vector-Jacobian product of ``clip_rows`` at ``x``: a clipped row is c·x/‖x‖, whose Jacobian is
    (c/‖x‖)(I − x̂x̂ᵀ); an unclipped row passes ``grad`` unchanged."""
    clipped = scale < 1
    if not bool(clipped.any()):
        return grad
    xf, gf = x.float(), grad.float()
    unit = xf / torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min(1e-30)
    pulled = scale * (gf - unit * (unit * gf).sum(-1, keepdim=True))
    return torch.where(clipped, pulled, gf).to(grad.dtype)


def gaussian_noise(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std


def dx_noise(shape: tuple[int, ...], epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """Noise for dχ-privacy in R^d (d = the last dimension): density ∝ exp(−ε‖z‖), drawn as a uniform direction
    times a radius ~ Gamma(d, 1/ε), the sum of d exponentials of rate ε (Feyisetan et al. 2020; Wu et al. 2017)."""
    direction = torch.randn(shape, generator=generator)
    direction = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True).clamp_min(1e-30)
    exponentials = -torch.log1p(-torch.rand(shape, generator=generator, dtype=torch.float64))
    return direction * (exponentials.sum(-1, keepdim=True) / epsilon).float()


def dx_release(embeds: torch.Tensor, epsilon: float, table: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """The dχ mechanism on token embeddings [..., d]: ``dx_noise`` added; with ``table`` ([V, d]) each noised row is
    replaced by its nearest table row (a token substitution), the gradient passing straight through."""
    noisy = embeds + dx_noise(tuple(embeds.shape), epsilon, generator).to(embeds.device, embeds.dtype)
    if table is None:
        return noisy
    snapped = table[nearest_rows(noisy.detach(), table.detach()).to(table.device)].to(embeds.dtype)
    return embeds + (snapped - embeds).detach()


def nearest_rows(x: torch.Tensor, table: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each row of ``x`` ([..., d]) the index of the nearest row of ``table`` ([V, d]) in L2 distance."""
    flat = x.reshape(-1, x.shape[-1]).float()
    t = table.float()
    sq = (t * t).sum(1)
    best = torch.empty(flat.shape[0], dtype=torch.long)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start:start + chunk]
        best[start:start + chunk] = (sq[None, :] - 2 * part @ t.T).argmin(1).cpu()
    return best.view(x.shape[:-1])


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sample distance correlation (Székely et al. 2007) between the rows of ``x`` [n, p] and ``y`` [n, q]:
    0 when independent, 1 when one is a similarity transform of the other; differentiable (NoPeek's term)."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"distance correlation needs the same number (≥ 2) of rows, got {x.shape[0]} and {y.shape[0]}")

    def centred(z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        sq = (z * z).sum(1)
        # distances from the Gram matrix, floored above 0: cdist's gradient is NaN at a zero distance (the diagonal)
        d = torch.sqrt((sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(1e-12))
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(x), centred(y)
    dcov2_xy = (a * b).mean()
    dcov2_xx, dcov2_yy = (a * a).mean(), (b * b).mean()
    denom = torch.sqrt(dcov2_xx * dcov2_yy)
    return torch.sqrt(dcov2_xy.clamp_min(0) / denom.clamp_min(1e-30))


def answer_classes(answers: list[list[int]]) -> list[int | None] | None:
    """Each example's class from its answer (its labels at the loss positions, in order): at the first answer index
    where the micro-batch's answers disagree, 1 for the most frequent label there and 0 for any other (one-vs-rest
    when there are more than two); None for an example whose answer ends before that index (truncated: it shares
    every label it has with the others) or is empty. None overall: every answer agrees, one class."""
    for k in range(max((len(a) for a in answers), default=0)):
        values = [a[k] for a in answers if len(a) > k]
        if len(set(values)) > 1:
            counts = {v: values.count(v) for v in values}
            top = min(counts, key=lambda v: (-counts[v], v))
            return [None if len(a) <= k else int(a[k] == top) for a in answers]
    return None


def marvell_variances(s0: float, s1: float, dim: int, p: float, power: float) -> tuple[tuple[float, float, float, float], float]:
    """Marvell's noise (Li et al., ICLR'22, §4): ``((along0, across0, along1, across1), sum_kl)``.

    The gradients of class c (share 1 − p for class 0, p for class 1) are taken as N(mean_c, s_c·I) in ``dim``
    dimensions; class c's noise is N(0, across_c·I + (along_c − across_c)·ΔΔᵀ/‖Δ‖²), Δ = mean_1 − mean_0. The
    variances minimise KL(P̃1‖P̃0) + KL(P̃0‖P̃1) of the noised distributions (the bound on any detector's leak AUC)
    subject to (1 − p)·(along0 + (dim − 1)·across0) + p·(along1 + (dim − 1)·across1) = power, all in units of ‖Δ‖²
    (scale-free). More noise never raises the KL, so the whole budget is spent. Across Δ only the class of smaller
    variance gets noise, at most until both are equal (more cannot lower the KL there). Along Δ the KL is convex on
    the budget's line, so its best split between the classes is a bisection on the slope; what is left, the share
    of the budget across Δ, is a grid zoomed in three times around its best point."""
    rest = dim - 1
    small = 0 if s0 <= s1 else 1  # the class that takes the noise across Δ
    share = (1 - p, p)[small]
    cap = min(power, share * rest * abs(s1 - s0))  # what equalising the variances across Δ costs, at most the budget

    def along(budget):
        """The classes' variances along Δ, noise included, for the best split of an along-Δ ``budget``."""
        lo, hi = np.full_like(budget, s0), s0 + budget / (1 - p)
        for _ in range(40):
            x = (lo + hi) / 2
            y = s1 + (budget - (1 - p) * (x - s0)) / p
            with np.errstate(divide="ignore", invalid="ignore"):
                slope = 1 / y - (y + 1) / x ** 2 - (1 - p) / p * (1 / x - (x + 1) / y ** 2)
            lo, hi = np.where(slope < 0, x, lo), np.where(slope < 0, hi, x)
        x = (lo + hi) / 2
        return x, s1 + (budget - (1 - p) * (x - s0)) / p

    def solve(beta):
        """(sum KL, along0, across0, along1, across1) with a share ``beta`` of ``cap`` across Δ."""
        c = beta * cap / (share * rest) if cap > 0 else 0 * beta
        x, y = along(power - beta * cap)
        c0, c1 = c * (small == 0), c * (small == 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = (s1 + c1) / (s0 + c0) if rest and s0 != s1 else 1.0
            kl = 0.5 * (rest * (r + 1 / r) + (y + 1) / x + (x + 1) / y) - dim
        return np.where(np.isfinite(kl), kl, np.inf), x - s0, c0, y - s1, c1

    lo, hi = 0.0, 1.0 if cap > 0 else 0.0
    for _ in range(4):
        betas = np.linspace(lo, hi, 65)
        kl = solve(betas)[0]
        i = int(np.argmin(kl))
        lo, hi = betas[max(i - 1, 0)], betas[min(i + 1, 64)]
    kl, *variances = solve(np.array([betas[i]]))
    return tuple(max(float(v[0]), 0.0) for v in variances), float(kl[0])


import math  # noqa: E402  (the analytic Gaussian below)


def analytic_gaussian_delta(epsilon: float, sigma: float, sensitivity: float) -> float:
    """The exact δ of the Gaussian mechanism N(0, σ²I) at ``epsilon`` for an L2 ``sensitivity`` (Balle & Wang, ICML'18,
    Theorem 8): δ = Φ(Δ/2σ − εσ/Δ) − e^ε·Φ(−Δ/2σ − εσ/Δ), the second term in log space so a large ε cannot overflow."""
    if sigma <= 0:
        return 1.0
    a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    return max(0.5 * math.erfc((b - a) / math.sqrt(2)) - math.exp(epsilon + _log_phi_below(a + b)), 0.0)


def _log_phi_below(z: float) -> float:
    """log Φ(−z), the standard normal's lower tail, exact from erfc and by its asymptotic series where erfc
    underflows (z > 30: the series' error is below 1e-12 there)."""
    if z < 30:
        return math.log(0.5 * math.erfc(z / math.sqrt(2)))
    r = 1 / (z * z)
    return -z * z / 2 - math.log(z * math.sqrt(2 * math.pi)) + math.log1p(-r + 3 * r * r - 15 * r ** 3 + 105 * r ** 4)


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest σ whose Gaussian mechanism is (``epsilon``, ``delta``)-DP for an L2 ``sensitivity``: the analytic
    Gaussian mechanism's calibration (Balle & Wang 2018, Algorithm 1), by bisection on the exact δ of
    ``analytic_gaussian_delta`` (decreasing in σ) to a relative 1e-12. It holds for every ε > 0, where the classical
    σ = Δ·√(2 ln(1.25/δ))/ε needs ε < 1 and is larger. ε = ∞ asks for no noise: 0."""
    if not (epsilon > 0 and 0 < delta < 1 and sensitivity > 0):
        raise ValueError(f"the analytic Gaussian needs epsilon > 0, 0 < delta < 1 and sensitivity > 0, got "
                         f"{epsilon}, {delta}, {sensitivity}")
    if math.isinf(epsilon):
        return 0.0
    return _least(lambda sigma: analytic_gaussian_delta(epsilon, sigma, sensitivity) <= delta, sensitivity)


def _least(holds, start: float) -> float:
    """The least x > 0 at which the monotone ``holds(x)`` is true (false below it), to a relative 1e-12: doubling from
    ``start``, then bisection."""
    lo, hi = 0.0, start
    while not holds(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    return hi


def clip_matrices(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Each example's matrix (the last two dimensions: its tokens' rows) scaled to Frobenius norm at most ``clip``;
    differentiable, and a matrix inside the ball keeps its bits."""
    norms = torch.linalg.vector_norm(x.float(), dim=(-2, -1), keepdim=True)
    scale = torch.where(norms > clip, clip / norms.clamp_min(1e-30), torch.ones_like(norms))
    return (x.float() * scale).to(x.dtype)


def analytic_gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest ε at which N(0, σ²I) is (ε, ``delta``)-DP for an L2 ``sensitivity`` (the inverse of
    ``analytic_gaussian_sigma``: δ(ε) of ``analytic_gaussian_delta`` is decreasing in ε); ∞ without noise."""
    if sigma <= 0:
        return math.inf
    if analytic_gaussian_delta(0.0, sigma, sensitivity) <= delta:
        return 0.0
    return _least(lambda epsilon: analytic_gaussian_delta(epsilon, sigma, sensitivity) <= delta, 1.0)
