"""Adversarial training: the client's term pushes its bottom against an inverter it trains on its own activations
(and only the bottom: the inverter learns from its own loss), the server's tap changes once the bottom has moved
(and not at all when off), and the attack runs against it with the defense announced."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from splittune.defenses import DefenseError
from splittune.config import load_config
from splittune.defenses.adversarial import Adversarial, AdversarialDefense
from splittune.privacy.attacks.base import run_attack
from splittune.privacy.attacks.inversion import Inversion
from splittune.privacy.knowledge import PublicKnowledge
from splittune.run import train
from splittune.taps.tap import Tap

from configs import SMALLEST, small

BASE = small(f"model={SMALLEST}", "train.steps=2", "train.seq_len=16", "data.max_documents=2", "data.max_train_examples=8")
ON = "defense=[{name: adversarial, weight: 5.0}]"


def _run(tmp_path, name, *sets):
    out = tmp_path / name
    return out, train(load_config(None, [*BASE, *sets]), out, record_tap=("server",))


def activations(out, step) -> list[torch.Tensor]:
    tap = Tap.open(out / "tap" / "server")
    return [r.tensor("hidden") for r in tap.records("activations", "up") if r.meta.get("train") and r.step == step]


def test_the_term_trains_the_bottom_against_the_inverter_and_the_inverter_on_its_own_loss():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 12, generator=g)
    d = Adversarial(AdversarialDefense(name="adversarial", weight=2.0), table, 16)
    ids, mask = torch.randint(0, 50, (3, 7), generator=g), torch.ones(3, 7, dtype=torch.long)
    mask[0, :2] = 0
    hidden = torch.randn(3, 7, 16, generator=g).requires_grad_(True)
    d.inputs(ids)
    term = d.penalty(None, hidden, mask, 0.5)
    inverter = d.inverter
    assert all(p.grad is not None for p in inverter.parameters())  # its own loss, before the term: 0.5 × CE
    grads = {n: p.grad.clone() for n, p in inverter.named_parameters()}
    keep = mask.bool()
    logits = inverter(hidden[keep].detach())
    ce = F.cross_entropy(logits, ids[keep], reduction="none")
    assert float(term) == pytest.approx(-2.0 * 0.5 * float(ce.clamp(max=math.log(50)).mean()), rel=1e-5)
    (h_grad,) = torch.autograd.grad(term, hidden)
    assert float(h_grad[~keep].abs().max()) == 0 and float(h_grad[keep].abs().max()) > 0  # padding carries no term
    assert all(torch.equal(grads[n], p.grad) for n, p in inverter.named_parameters())  # the term left the inverter alone
    before = inverter.map.weight.clone()
    d.before_optimizer()  # the inverter's Adam step
    assert not torch.equal(before, inverter.map.weight) and all(p.grad is None for p in inverter.parameters())
    assert d.figures(float(term))["adversarial_inverter_loss"] > 0
    capped = Adversarial(AdversarialDefense(name="adversarial", weight=1.0), table, 16)  # the twin: past chance, no push
    capped.inverter.fitted.fill_(True)
    with torch.no_grad():
        capped.inverter.map.weight.zero_()
        capped.inverter.map.bias.copy_(-table[ids[1, 3]])  # every position predicts away from ...
        capped.inverter.log_scale.fill_(10.0)
    capped.inputs(torch.full((1, 1), int(ids[1, 3])))  # ... the token it holds: CE far above log V
    h = torch.randn(1, 1, 16, requires_grad=True)
    t = capped.penalty(None, h, torch.ones(1, 1), 1.0)
    assert float(t) == pytest.approx(-math.log(50)) and torch.autograd.grad(t, h)[0].abs().max() == 0


def test_the_bottom_moves_away_from_the_inverter_and_nothing_when_off(tmp_path):
    clean_out, clean = _run(tmp_path, "clean", "train.lr=2e-3")
    out, summary = _run(tmp_path, "on", ON, "train.lr=2e-3")
    assert all(torch.equal(a, b) for a, b in zip(activations(clean_out, 1), activations(out, 1), strict=True))  # pretrained
    assert all(float((a - b).abs().max()) > 1e-4 for a, b in zip(activations(clean_out, 2), activations(out, 2), strict=True))
    figures = summary["privacy"]["adversarial"]
    assert figures["weight"] == 5.0 and figures["inverter_loss_first"] > 0 and figures["inverter_loss_last"] > 0
    off_out, off = _run(tmp_path, "off", "defense=[{name: adversarial, weight: 0.0}]", "train.lr=2e-3")
    assert all(torch.equal(a, b) for a, b in zip(activations(clean_out, 2), activations(off_out, 2), strict=True))
    assert off["train_loss_last"] == clean["train_loss_last"] and "adversarial" in off["privacy"]
    with pytest.raises(DefenseError, match="defense adversarial trains the client's bottom .* segments.bottom: frozen"):
        train(load_config(None, [*BASE, "segments.bottom=frozen", ON]), tmp_path / "frozen")

    public = PublicKnowledge(SMALLEST, aux="builtin:sentiment")  # the attack runs with the defense announced
    recovery = run_attack(Inversion({"aux_rows": 8, "random_rows": 4, "epochs": 1, "model": "linear"}),
                          Tap.open(out / "tap" / "server"), public)
    assert recovery.items and Tap.open(out / "tap" / "server").proposal()["defenses"] == [
        {"name": "adversarial", "weight": 5.0, "lr": 1e-3}]
