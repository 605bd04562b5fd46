"""Token substitution (``santext``, ``custext``): the sampling tables hold the exponential mechanism they claim (its
ratio bound holds for two tokens, and fails where the support is cut), a 50k vocabulary costs memory per token seen,
and in a run the server sees the substitutes' embeddings while the labels stay the true tokens."""

from __future__ import annotations

import math

import pytest
import torch

from splittune.config import load_config
from splittune.defenses.vocabulary import ExponentialRows, Groups
from splittune.run import train
from splittune.taps.tap import Tap, Truth
from configs import SMALLEST
from short_text import short_run


def _table(vocab=200, width=8, seed=0):
    return torch.randn(vocab, width, generator=torch.Generator().manual_seed(seed))


def _worst_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over outputs of |log P(y|x) − log P(y|x')| (inf where one of them cannot output y)."""
    both = torch.isfinite(a) & torch.isfinite(b)
    if not bool((torch.isfinite(a) == torch.isfinite(b)).all()):
        return math.inf
    return float((a[both] - b[both]).abs().max())


def test_santext_is_the_exponential_mechanism_with_its_metric_bound():
    table, eps = _table(), 3.0
    rows = ExponentialRows(table, eps, k=8)
    x, other = 3, 17
    a, b = rows.log_probs(x), rows.log_probs(other)
    assert float(a.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    distance = float((table[x] - table[other]).norm())
    assert _worst_ratio(a, b) <= eps * distance + 1e-9  # P(y|x) ≤ e^{ε·d(x,x')} P(y|x') for every y
    assert _worst_ratio(a, b) > 0.5 * eps * distance  # not vacuous: the bound is nearly reached
    rows.fill(torch.tensor([x]))
    assert torch.allclose(rows.logp[x], a[rows.top[x]])  # the table's rows are the exact distribution's top
    # the twin: a table alone (support cut to each token's top k) breaks the bound, so the check can fail
    cut = [torch.full_like(p, -math.inf).scatter(0, p.topk(8).indices, p.topk(8).values) for p in (a, b)]
    assert _worst_ratio(*cut) == math.inf


def test_santext_draws_follow_the_whole_distribution_tail_included():
    table = _table(vocab=60)
    rows = ExponentialRows(table, 0.6, k=4)  # a flat distribution: most of the mass beyond the table's top 4
    exact = rows.log_probs(5).exp()
    rows.fill(torch.tensor([5]))
    assert float(exact[rows.top[5]].sum()) < 0.5
    draws = rows.sample(torch.full((4000,), 5), torch.Generator().manual_seed(0))
    seen = torch.bincount(draws, minlength=60).double() / len(draws)
    assert 0.5 * float((seen - exact).abs().sum()) < 0.06  # total variation of 4000 draws over 60 outputs
    assert set(draws.tolist()) - set(rows.top[5].tolist())  # the tail is drawn from


def test_custext_sets_partition_the_vocabulary_with_an_epsilon_bound_inside_each():
    table, eps = _table(vocab=203), 2.0
    groups = Groups(table, eps, k=10)
    members = groups.members[groups.members >= 0]
    assert sorted(members.tolist()) == list(range(203))  # a partition: 20 sets of 10 and one of 3
    g = int(groups.group[0])
    a, b = (int(t) for t in groups.members[g, :2])
    assert a == 0  # the first set is anchored at the smallest id
    pa, pb = groups.logp[a], groups.logp[b]  # over the same outputs (their shared set)
    assert float(pa.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    assert _worst_ratio(pa, pb) <= eps + 1e-9
    assert int(pa.argmax()) == 0 and int(pb.argmax()) == 1  # each keeps itself most often
    # the twin: two tokens of different sets share no output, so no ε holds between them
    c = int(groups.members[(g + 1) % len(groups.members), 0])
    full = [torch.full((203,), -math.inf, dtype=torch.float64).index_copy(0, groups.members[groups.group[t]].clamp_min(0),
                                                                          groups.logp[t]) for t in (a, c)]
    assert _worst_ratio(*full) == math.inf


def test_the_batched_grouping_is_the_one_anchor_at_a_time_greedy():
    """Each candidate of a batch is the next anchor only if no group before it took it: the partition is exactly the
    sequential greedy's (the twin: skipping that check gives overlapping sets, so the comparison can fail)."""
    from splittune.defenses.vocabulary import _greedy

    def one_at_a_time(t, k, check=True):
        sq, taken, out = (t * t).sum(1), torch.zeros(len(t), dtype=torch.bool), []
        candidates = list(range(len(t)))
        while not bool(taken.all()):
            first = int((~taken).nonzero()[0]) if check else candidates.pop(0)
            d2 = (sq - 2 * t @ t[first]).masked_fill(taken, math.inf)
            d2[first] = -math.inf
            pick = d2.topk(min(k, int((~taken).sum())), largest=False).indices
            taken[pick] = True
            out.append(pick)
        return out

    table = _table(vocab=700, width=12)
    batched, sequential = _greedy(table, 9, batch=16), one_at_a_time(table, 9)
    assert len(batched) == len(sequential) and all(torch.equal(a, b) for a, b in zip(batched, sequential))
    unchecked = one_at_a_time(table, 9, check=False)  # anchors taken in id order whether grouped already or not
    assert len(unchecked) != len(sequential) or any(not torch.equal(a, b) for a, b in zip(unchecked, sequential))


def test_a_50k_vocabulary_costs_memory_per_token_seen():
    table = _table(vocab=50_000, width=16)
    rows = ExponentialRows(table, 2.0, k=32)
    ids = torch.randint(0, 50_000, (2, 16), generator=torch.Generator().manual_seed(1))
    out = rows.sample(ids, torch.Generator().manual_seed(2))
    assert out.shape == ids.shape and int(rows.known.sum()) == len(torch.unique(ids))
    assert rows.top.shape == (50_000, 32)  # never V × V


@pytest.mark.parametrize("kind", ["santext", "custext"])
def test_through_the_embedding_output_alone_it_substitutes_the_same_way(kind):
    """A host that hooks only the embedding output (an attacker replaying the defense on a public bottom) gets the
    same substitutes as the client's id hook: the rows are table rows, so their ids are found exactly."""
    from splittune.defenses.custext import CusText, CusTextDefense
    from splittune.defenses.santext import SanText, SanTextDefense

    table = _table(vocab=120, width=6)
    make = {"santext": lambda: SanText(SanTextDefense(name="santext", epsilon=2.0), table, 7),
            "custext": lambda: CusText(CusTextDefense(name="custext", epsilon=1.0, top=6), table, 7)}[kind]
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    by_ids, by_rows = make(), make()
    substituted = by_ids.tokens(ids, 4, 1)
    assert torch.equal(by_ids.embeddings(table[substituted], 4, 1), table[substituted])  # after the id hook: nothing more
    assert torch.equal(by_rows.embeddings(table[ids], 4, 1), table[substituted])
    assert not torch.equal(substituted, ids)


def _tap_and_truth(out):
    tap, truth = Tap.open(out / "tap" / "server"), Truth.open(out / "tap" / "truth")
    rec = next(r for r in tap.records("activations", "up") if r.meta.get("train") and r.step == 1)
    return rec, truth.batch(rec.session, rec.step, rec.micro)


@pytest.mark.parametrize("entry", ["{name: santext, epsilon: 80}", "{name: custext, epsilon: 4, top: 8}"])
def test_the_server_sees_substitutes_and_the_true_labels(tmp_path, entry):
    """Cut 0: what crosses is the embedding output itself, so each tapped row is one token's embedding row."""
    out = tmp_path / "run"
    summary = train(load_config(None, short_run(tmp_path, "cuts=[0]", f"defense=[{entry}]")), out, record_tap=("server",))
    rec, sent = _tap_and_truth(out)
    from splittune.privacy.knowledge import PublicKnowledge

    table = PublicKnowledge(SMALLEST).embeddings()
    hidden = rec.tensor("hidden")
    ids = torch.cdist(hidden.flatten(0, 1), table).argmin(1).view(hidden.shape[:2])
    assert torch.allclose(table[ids], hidden, atol=1e-6)  # every row is a token's embedding: a substitution
    changed = float((ids != sent["input_ids"]).float().mean())
    assert 0.1 < changed < 1.0, changed  # some tokens replaced, not all
    assert torch.equal(rec.tensor("labels"), sent["labels"])  # the labels stay the client's true tokens
    assert summary[f"{entry.split(',')[0].split()[-1]}_epsilon"] == float(entry.split("epsilon: ")[1].split(",")[0].rstrip("}"))
