"""(ε, δ) of the Gaussian mechanisms, from opacus' RDP accountant (Mironov 2017; the accountant opacus maintains and
tests), never a hand-written bound.

Activations are released without subsampling amplification: the accountant composes each sample's releases at
sampling rate 1 (a sample is released every time it is in a batch, and shuffled epochs are not Poisson sampling,
which the amplification theorems assume). DP-SGD on the client's adapters uses the batch's sampling rate, as
opacus does, and says so.
"""

from __future__ import annotations

import math
import warnings


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float, sample_rate: float = 1.0) -> float:
    """ε after ``releases`` compositions of the Gaussian mechanism with noise std = ``noise_multiplier`` × sensitivity
    (``math.inf`` without noise; 0 for nothing released)."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant  # here: opacus configures the root logger when it loads

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(releases))]
    with warnings.catch_warnings():  # "optimal order at the edge of the range": the bound is valid, only not the tightest
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, releases: int, delta: float, sample_rate: float = 1.0) -> float:
    """The smallest noise multiplier whose ``releases`` compositions stay within ``target_epsilon`` (opacus' search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=max(int(releases), 1), accountant="rdp"))


def most_releases(examples: int, per_step: int, steps: int) -> int:
    """How often the most-seen training example crossed: ``steps`` batches of ``per_step`` examples drawn epoch by
    epoch from ``examples`` (a full epoch releases each once; a partial one releases some once more)."""
    if examples <= 0:
        return 0
    return math.ceil(steps * per_step / examples)
