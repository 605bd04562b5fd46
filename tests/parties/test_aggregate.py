"""Stage 7 aggregate: FedAvg (block-wise), exact averaging of LoRA of differing ranks, folds."""

from __future__ import annotations

import pytest
import torch

from splittune.averaging import Contribution, add_delta, average, lora_module, low_rank

M = "model.layers.1.self_attn.q_proj"
A_, B_ = f"{M}.lora_A.weight", f"{M}.lora_B.weight"
UP = "model.layers.0.mlp.up_proj.weight"


def test_fedavg_hand_computed():
    out = average([
        Contribution(1.0, {UP: torch.tensor([1.0, 2.0])}, alpha=8),
        Contribution(3.0, {UP: torch.tensor([5.0, 6.0])}, alpha=8),
    ])
    assert torch.equal(out.tensors[UP], torch.tensor([4.0, 5.0]))  # (1*[1,2] + 3*[5,6]) / 4
    assert out.folds == {}


def test_blockwise_renormalised_over_holders():
    other = "model.layers.5.mlp.down_proj.weight"
    out = average([
        Contribution(1.0, {UP: torch.tensor([0.0]), other: torch.tensor([10.0])}, alpha=8),
        Contribution(2.0, {UP: torch.tensor([3.0])}, alpha=8),
        Contribution(3.0, {UP: torch.tensor([6.0]), other: torch.tensor([2.0])}, alpha=8),
    ])
    assert torch.equal(out.tensors[other], torch.tensor([4.0]))  # (1*10 + 3*2) / 4, not / 6
    assert torch.equal(out.tensors[UP], torch.tensor([4.0]))  # (0 + 6 + 18) / 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_identical_contributions_come_back_bit_identical(dtype):
    g = torch.Generator().manual_seed(0)
    t = {UP: torch.randn(16, 8, generator=g).to(dtype),
         A_: torch.randn(4, 8, generator=g).to(dtype), B_: torch.randn(16, 4, generator=g).to(dtype)}
    out = average([Contribution(1.0, t, alpha=8) for _ in range(3)])
    assert set(out.tensors) == set(t) and out.folds == {}
    for name, x in t.items():
        assert out.tensors[name].dtype == dtype
        assert torch.equal(out.tensors[name], x), name
    out = average([Contribution(w, t, alpha=8) for w in (0.1, 0.7, 3.3)])
    assert all(torch.equal(out.tensors[n], x) for n, x in t.items())


def test_same_rank_and_alpha_averages_factors():
    out = average([
        Contribution(1.0, {A_: torch.ones(2, 3), B_: torch.zeros(4, 2)}, alpha=4),
        Contribution(3.0, {A_: torch.full((2, 3), 5.0), B_: torch.full((4, 2), 4.0)}, alpha=4),
    ])
    assert torch.equal(out.tensors[A_], torch.full((2, 3), 4.0))
    assert torch.equal(out.tensors[B_], torch.full((4, 2), 3.0))
    assert out.folds == {}


def _lora(rank, out_f=12, in_f=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {A_: torch.randn(rank, in_f, generator=g), B_: torch.randn(out_f, rank, generator=g)}


def _reference(contribs):
    total = sum(c.weight for c in contribs)
    return sum(c.weight / total * c.alpha / c.tensors[A_].shape[0] * c.tensors[B_].double() @ c.tensors[A_].double()
               for c in contribs)


def test_rank_heterogeneous_is_exact_and_naive_padding_is_not():
    contribs = [Contribution(w, _lora(r, seed=r), alpha=16) for w, r in [(1.0, 2), (2.0, 4), (5.0, 8)]]
    out = average(contribs)
    assert out.tensors == {}  # nothing for this module: it is folded
    B, A = out.folds[M]
    assert B.shape == (12, 14) and A.shape == (14, 10)
    ref = _reference(contribs)
    assert (out.delta(M).double() - ref).norm() / ref.norm() < 1e-6
    assert ((B.double() @ A.double()) - ref).norm() / ref.norm() < 1e-6

    # the naive way: zero-pad every factor to the largest rank, average the factors, multiply
    R, total = 8, sum(c.weight for c in contribs)
    pa = sum(c.weight / total * torch.nn.functional.pad(c.tensors[A_], (0, 0, 0, R - c.tensors[A_].shape[0])) for c in contribs)
    pb = sum(c.weight / total * torch.nn.functional.pad(c.tensors[B_], (0, R - c.tensors[B_].shape[1])) for c in contribs)
    naive = (16 / R) * pb.double() @ pa.double()
    assert (naive - ref).norm() / ref.norm() > 0.3


def test_same_rank_different_alpha_goes_to_folds():
    contribs = [Contribution(1.0, _lora(4, seed=1), alpha=8), Contribution(1.0, _lora(4, seed=2), alpha=32)]
    out = average(contribs)
    assert M in out.folds and A_ not in out.tensors and B_ not in out.tensors
    ref = _reference(contribs)
    assert (out.delta(M).double() - ref).norm() / ref.norm() < 1e-6


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_add_delta(fan_in_fan_out):
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(6, 5, generator=g)
    W = torch.randn(5, 6, generator=g) if fan_in_fan_out else torch.randn(6, 5, generator=g)
    expected = W + (delta.T if fan_in_fan_out else delta)
    add_delta(W, delta, fan_in_fan_out)
    assert torch.equal(W, expected)
    with pytest.raises(ValueError, match=r"cannot fold a \(\d+, \d+\) update into a \(\d+, \d+\) weight"):
        add_delta(W, delta, not fan_in_fan_out)


def test_low_rank_recovers_exact_rank():
    g = torch.Generator().manual_seed(4)
    M3 = torch.randn(20, 3, generator=g) @ torch.randn(3, 15, generator=g)
    B, A = low_rank(M3)
    assert B.shape == (20, 3) and A.shape == (3, 15)
    assert torch.allclose(B @ A, M3, atol=1e-5)
    B0, A0 = low_rank(torch.zeros(4, 5))
    assert B0.shape == (4, 1) and A0.shape == (1, 5) and not B0.any() and not A0.any()


def test_lora_module_names():
    assert lora_module(A_) == (M, "A")
    assert lora_module(B_) == (M, "B")
    assert lora_module(UP) is None


def test_errors():
    with pytest.raises(ValueError, match="no contributions"):
        average([])
    with pytest.raises(ValueError, match=r"up_proj.*\(2,\).*\(3,\)"):
        average([Contribution(1, {UP: torch.zeros(2)}, 8), Contribution(1, {UP: torch.zeros(3)}, 8)])
    with pytest.raises(ValueError, match="weight 0"):
        average([Contribution(0, {UP: torch.zeros(2)}, 8)])
    with pytest.raises(ValueError, match="NaN"):
        average([Contribution(1, {UP: torch.tensor([0.0, float("nan")])}, 8)])
    with pytest.raises(ValueError, match="NaN or Inf"):
        average([Contribution(1, {UP: torch.tensor([float("inf")])}, 8)])
    with pytest.raises(ValueError, match="has no lora_B"):
        average([Contribution(1, {A_: torch.zeros(2, 3)}, 8)])
