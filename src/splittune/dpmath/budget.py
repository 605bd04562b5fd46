"""What a run's defenses guarantee, for its summary.json: each ε with what it covers (docs/privacy.md says more).

- ``gaussian``: each release of a token's clipped activation row (sensitivity ``clip``, noise σ·clip) is the
  Gaussian mechanism; a training example is released every time it is in a batch, composed without subsampling
  amplification (``accounting.py``). ``epsilon_per_token`` protects one row; a token also shapes the rows after
  it (attention), so ``epsilon_per_example`` protects a whole example's rows at once (seq_len rows, sensitivity
  √seq_len·clip). Evaluation passes release the held-out examples and are reported on their own.
- ``dx``: metric DP per token embedding (ε·distance), composing linearly over releases.
- DP-SGD: each step is a subsampled Gaussian mechanism on the clipped per-example gradients of the client's
  adapters; ``epsilon`` uses the sampling rate (opacus' convention, which assumes Poisson sampling) and
  ``epsilon_without_amplification`` composes only the steps an example was in, which holds for shuffled epochs.
"""

from __future__ import annotations

import math
from typing import Any

from .accounting import gaussian_epsilon, most_releases


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x  # JSON has no infinity: null means "no guarantee" (no noise)


def defense_summary(defenses: list[dict[str, Any]], seq_len: int, per_step: int, metrics: list[dict[str, Any]],
                    train_sizes: list[int], clients: list[int], eval_passes: int, dp_sgd: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary keys of ``defenses`` (plain dicts of the config's entries) and DP-SGD (its config with the noise
    multiplier used and the largest sampling rate): ``privacy`` with every figure, and a top-level
    ``<name>_epsilon`` for each that has an ε."""
    if not defenses and dp_sgd is None:
        return {}
    steps = [sum(1 for m in metrics if m["client"] == c) for c in clients]
    releases = max(most_releases(n, per_step, k) for n, k in zip(train_sizes, steps))
    out: dict[str, Any] = {"privacy": {"defenses": defenses, "releases_per_example": releases, "eval_passes": eval_passes}}
    if dp_sgd is not None:
        sigma, delta, rate = dp_sgd["noise_multiplier"], dp_sgd["delta"], dp_sgd["sample_rate"]
        figures = {**dp_sgd, "steps": max(steps),
                   "epsilon": _finite(gaussian_epsilon(sigma, max(steps), delta, sample_rate=rate)),
                   "epsilon_without_amplification": _finite(gaussian_epsilon(sigma, releases, delta)),
                   "accountant": "opacus RDP at the sampling rate (it assumes Poisson sampling; batches here are shuffled "
                                 "epochs, for which epsilon_without_amplification is the bound that holds)"}
        out["privacy"]["dp_sgd"] = figures
        bounds = [figures["epsilon"], figures["epsilon_without_amplification"]]
        out["dp_sgd_epsilon"] = None if None in bounds else max(bounds)  # the larger: it holds whichever sampling applies
    for d in defenses:
        if d["name"] == "gaussian":
            sigma, delta = d["sigma"], d["delta"]
            figures = {
                "delta": delta,
                "epsilon_per_token": _finite(gaussian_epsilon(sigma, releases, delta)),
                "epsilon_per_example": _finite(gaussian_epsilon(sigma / math.sqrt(seq_len), releases, delta)),
                "eval_epsilon_per_token": _finite(gaussian_epsilon(sigma, eval_passes, delta)),
                "accountant": "opacus RDP, sampling rate 1 (no amplification)",
            }
            out["privacy"]["gaussian"] = figures
            out["gaussian_epsilon"] = figures["epsilon_per_token"]
        elif d["name"] == "dx":
            eps = d["epsilon"]
            out["privacy"]["dx"] = {"epsilon_per_token": eps, "epsilon_per_token_all_releases": eps * (releases + eval_passes)}
            out["dx_epsilon"] = eps
        elif d["name"] == "nopeek":
            dcor = [m["nopeek_dcor"] for m in metrics if "nopeek_dcor" in m]
            out["privacy"]["nopeek"] = {"alpha": d["alpha"], "dcor_first": dcor[0] if dcor else None,
                                        "dcor_last": dcor[-1] if dcor else None}
    return out
