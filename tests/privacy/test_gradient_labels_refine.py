"""gradient-labels through a top with blocks: the solve of g = Bᵀe stalls (a block's vjp is ill-conditioned) and
its error can make e point at a wrong label, most easily where e is small (a confident position), so the
per-position test names that wrong label; refining with the fact that a label is a vocabulary row
(``label_refine.py``: keep what the exact gradient of the labels confirms, fit the rest by least squares over
candidate labels) recovers every one. Synthetic gradients on the small model's pretrained top, its head sharpened so
that many positions are confident, as a trained model's are; the stalled solve's error is put where it hurts: e at
five confident positions points at a decoy label (and so even looks explained)."""

from __future__ import annotations

import pytest
import torch

from splittune.privacy.attacks.gradient_labels import RowOperator, cgls, linear_labels
from splittune.privacy.attacks.label_refine import directions, refine_row
from splittune.privacy.knowledge import PublicKnowledge
from configs import SMALL

T, ITERS = 24, 30


@pytest.fixture(scope="module")
def case():
    """One row through the pretrained top (block 3 of 4, float64): its operator, the norm, a sharpened head, true
    labels (the model's own guess where it is confident, random elsewhere) and the gradient they produce (N = 50)."""
    public = PublicKnowledge(SMALL)
    top = public.segment(3, 4, torch.float64)
    norm, head = top.module(top.spec.post[0]), top.model.get_output_embeddings().weight.detach() * 100
    g0 = torch.Generator().manual_seed(0)
    op = RowOperator(top, torch.randn(1, T, public.width, generator=g0, dtype=torch.float64), torch.ones(1, T, dtype=torch.long))
    x = op.x[0]
    p = torch.softmax(norm(x) @ head.T, -1)
    labels = torch.randint(0, 259, (T,), generator=g0)
    confident = p.max(-1).values > 0.9
    labels[confident] = p.argmax(-1)[confident]
    g = op.At(directions(norm, head, x, labels[:, None])[:, 0][None] / 50)[0]
    return op, norm, head, labels, g, confident


def _stalled(case):
    """e as a stalled solve leaves it: right at most positions, but at the confident ones (tiny e) pointing at a
    decoy label (the per-position test then names the decoy, and that e even looks explained)."""
    op, norm, head, labels, g, confident = case
    decoys = (labels + 7) % 259
    e = directions(norm, head, op.x[0], torch.where(_misled(case), decoys, labels)[:, None])[:, 0] / 50
    return e


def _misled(case):
    """Where the stalled solve points e at a decoy: five confident positions (a few, as through a real block)."""
    confident = case[5]
    misled = torch.zeros_like(confident)
    misled[confident.nonzero().flatten()[:5]] = True
    return misled


def _recover(case, rounds):
    op, norm, head, labels, g, _ = case
    e = _stalled(case)
    decode = lambda x, e: linear_labels(norm, head, x, e, 259, top=4)  # noqa: E731
    solve = lambda b, only: cgls(op, b[None], torch.zeros_like(b[None]), ITERS, 1e-12, only)[0][0]  # noqa: E731
    candidates = decode(op.x[0], e)
    got, info = refine_row(op, norm, head, e, g, torch.ones(T, dtype=torch.bool), candidates, rounds, solve, decode)
    return got, info


def test_the_refined_solve_recovers_the_labels_the_stalled_solve_misses(case):
    labels, misled = case[3], _misled(case)
    assert int(misled.sum()) == 5
    plain, _ = _recover(case, rounds=0)
    assert (plain[misled] != labels[misled]).all() and (plain[~misled] == labels[~misled]).all()  # the twin
    refined, info = _recover(case, rounds=3)
    assert torch.equal(refined, labels), info
    assert info["unexplained"][1] >= 5 and info["unexplained"][-1] == 0


def test_the_plain_solve_through_the_block_is_what_refinement_starts_from(case):
    """The operator and CGLS the attack uses: from g alone (no decoys) the solve and the test name every label."""
    op, norm, head, labels, g, _ = case
    e, residual = cgls(op, g[None], torch.zeros_like(g[None]), ITERS, 1e-12)
    assert residual < 1e-6
    assert torch.equal(linear_labels(norm, head, op.x[0], e[0], 259), labels)
