"""DP-Forward: the analytic Gaussian calibration is Balle & Wang's exact δ (known values, and a σ any smaller breaks
it), the sub-layer is a block of the client's bottom, and each norm clips one example and is noised at the std its
sensitivity calls for (the server's view in a run: ``test_forward_defenses_in_runs.py``)."""

from __future__ import annotations

import math

import pytest
import torch

from splittune.config import load_config
from splittune.defenses import DefenseError
from splittune.defenses.dp_forward import DpForward
from splittune.dpmath.mechanisms import analytic_gaussian_delta, analytic_gaussian_sigma, clip_matrices, clip_rows
from splittune.run import build
from configs import SMALLEST, small

RUN = small(f"model={SMALLEST}", "cuts=[2]")


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def test_the_calibration_is_the_analytic_gaussian_mechanism():
    """δ(σ) = Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ) (Balle & Wang 2018, Theorem 8), written here with math.erfc."""
    assert analytic_gaussian_sigma(1.0, 1e-5) == pytest.approx(3.7306, abs=1e-4)  # Balle & Wang's ε = 1, δ = 1e-5
    for eps, delta, sens in [(1.0, 1e-5, 1.0), (0.5, 1e-6, 2.0), (8.0, 1e-5, 3.0)]:
        sigma = analytic_gaussian_sigma(eps, delta, sens)
        a, b = sens / (2 * sigma), eps * sigma / sens
        assert _phi(a - b) - math.exp(eps) * _phi(-a - b) == pytest.approx(delta, rel=1e-6)  # tight: δ exactly
        assert analytic_gaussian_delta(eps, 0.99 * sigma, sens) > delta  # the twin: any less noise breaks (ε, δ)
        assert analytic_gaussian_sigma(eps, delta, 2 * sens) == pytest.approx(2 * sigma, rel=1e-9)  # σ ∝ Δ
    classical = math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5  # Dwork & Roth's σ for ε < 1: valid but loose
    assert analytic_gaussian_sigma(0.5, 1e-5) < classical and analytic_gaussian_delta(0.5, classical, 1.0) < 1e-5
    assert analytic_gaussian_sigma(math.inf, 1e-5) == 0.0
    with pytest.raises(ValueError, match="epsilon > 0"):
        analytic_gaussian_sigma(0.0, 1e-5)


def test_the_sub_layer_is_a_block_of_the_bottom():
    from splittune.defenses import Placement

    client = build(load_config(None, [*RUN, "defense=[{name: dp-forward, epsilon: 8, clip: 1}]"]))[0]
    blocks = client.party.blocks
    assert client.defenses.find(DpForward).block is blocks[2]  # the first block the client lacks: what crosses the cut
    settings = DpForward.Settings(name="dp-forward", epsilon=8, clip=1, at=0)
    made = DpForward.create(settings, Placement(client.party, 1))
    assert made.block is blocks[1]  # block 0's output is block 1's input
    x = torch.randn(1, 4, blocks[1].self_attn.o_proj.out_features)
    assert made._entering(blocks[1], (x,), {}) is None  # not armed: a forward without the defenses is untouched
    made.embeddings(x, 3, 0)  # the bottom's forward starts (the embedding hook): the block's input gets the noise
    (noised, *_), _ = made._entering(blocks[1], (x,), {})
    assert torch.equal(noised, made.release(x, 3, 0)) and made._entering(blocks[1], (x,), {}) is None  # once
    made.close()
    assert not blocks[1]._forward_pre_hooks  # closed: its hook is gone
    assert DpForward.create(settings.model_copy(update={"at": "embeddings"}), Placement(client.party, 1)).block is None
    with pytest.raises(DefenseError, match=r"at: 2 is not a block of the client's bottom \(blocks 0 to 1 before the cut at 2\)"):
        DpForward.create(settings.model_copy(update={"at": 2}), Placement(client.party, 1))
    client.defenses.close()


def test_each_norm_bounds_one_example_and_the_noise_is_calibrated_to_it():
    """``release`` itself: a frobenius clip bounds an example's matrix (sensitivity 2·clip), a row clip each row (an
    example of T rows: 2·clip·√T); the noise std is σ per unit × that sensitivity."""
    from splittune.defenses.dp_forward import DpForwardDefense

    x = torch.randn(64, 16, 8, generator=torch.Generator().manual_seed(0))
    for norm, bound, sensitivity in [("frobenius", lambda y: torch.linalg.vector_norm(y, dim=(-2, -1)), 2.0),
                                     ("row", lambda y: torch.linalg.vector_norm(y, dim=-1), 2.0 * 4)]:
        d = DpForward(DpForwardDefense(name="dp-forward", epsilon=4, clip=1.0, norm=norm), None, secret=5)
        clipped = clip_matrices(x, 1.0) if norm == "frobenius" else clip_rows(x, 1.0)[0]
        assert float(bound(clipped).max()) <= 1.0 + 1e-5 and float(bound(x).max()) > 1.0  # it binds, and bounds
        noise = d.release(x, 1, 0) - clipped
        assert d.sigma(16) == pytest.approx(analytic_gaussian_sigma(4.0, 1e-5) * sensitivity)
        assert float(noise.std()) == pytest.approx(d.sigma(16), rel=0.02)
        assert torch.equal(d.release(x, 1, 0), d.release(x, 1, 0)) and not torch.equal(d.release(x, 1, 0), d.release(x, 1, 1))


@pytest.mark.parametrize("entry, fragment", [
    ("{name: dp-forward, epsilon: 1, clip: 1, at: middle}", "defense.0.dp-forward.at: must be last, embeddings or a block index"),
    ("{name: dp-forward, epsilon: 1, clip: 1, at: 2}", "dp-forward at: 2 is not a block of the client's bottom (cuts=[2]: blocks 0 to 1)"),
    ("{name: dp-forward, epsilon: 1}", "defense.0.dp-forward.clip"),
    ("{name: santext, epsilon: 0}", "defense.0.santext.epsilon: Input should be greater than 0"),
    ("{name: custext, epsilon: 1, top: 1}", "defense.0.custext.top"),
    ("{name: privtune, epsilon: 1, hops: 9}", "defense.0.privtune.hops"),
])
def test_a_bad_entry_is_refused_naming_its_key(entry, fragment):
    from splittune.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, [*RUN, f"defense=[{entry}]"])
    assert fragment in str(err.value) and "\n" not in str(err.value).strip()
    load_config(None, [*RUN, "defense=[{name: dp-forward, epsilon: 1, clip: 1, at: 1}]"])  # the twin: block 1 is the bottom's
