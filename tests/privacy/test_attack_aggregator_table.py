"""The aggregator attack where the setting lets it read everything: a bottom trained in full sends its embedding
table to the average, and a row moves only when its token was in the client's batches (Adam leaves a row whose
gradient was always 0 where it was), so the round's bag is read exactly, under AdamW (a table tied to the head moves
every row, and the batch's rows are those that leave the directions all rows share). Secure aggregation is what takes
it to nothing: the masked words move every row alike and name no token (the twin)."""

from __future__ import annotations

import pytest
import torch

from splittune.config import load_config
from splittune.privacy.attacks.aggregator import AggregatorInversion, changed_rows
from splittune.privacy.attacks.base import run_attack
from splittune.privacy.judge import score
from splittune.privacy.knowledge import PublicKnowledge
from splittune.run import train
from splittune.taps.tap import Tap, Truth
from configs import SMALL, small

SETS = small("clients=3", "schedule=sfl-v2", "aggregate_every=1", "segments.bottom=full", "train.steps=2",
             "train.seq_len=16", "train.lr=0.01", "data.max_train_examples=24")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, extra in {"plain": [], "secure": ["secure_aggregation=true"]}.items():
        folder = tmp_path_factory.mktemp(name)
        train(load_config(None, [*SETS, *extra]), folder, record_tap=("aggregator",))
        out[name] = folder
    return out, PublicKnowledge(SMALL)


def _attack(folder, public):
    recovery = run_attack(AggregatorInversion(), Tap.open(folder / "tap" / "aggregator"), public)
    return recovery, score(recovery, Truth.open(folder / "tap" / "truth"), public.tokenizer)


def test_a_fully_trained_bottom_gives_each_rounds_tokens_away_and_secure_aggregation_hides_them(runs):
    out, public = runs
    recovery, plain = _attack(out["plain"], public)
    assert recovery.info["signal"] == "embedding rows that moved" and len(recovery.items) == 6  # 3 clients x 2 rounds of one step
    assert plain["precision"] > 0.9 and plain["recall"] > 0.9, plain  # a row's last token gets no gradient: not all
    recovery, secure = _attack(out["secure"], public)
    assert all(item.bag == [] for item in recovery.items) and secure["f1"] == 0.0, secure


def test_the_row_test_reads_a_sparse_update_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(50, 8, generator=g)
    delta = -1e-3 * start  # weight decay alone: every row by the same factor, no token
    delta[[3, 17, 41]] += 0.01 * torch.randn(3, 8, generator=g)
    assert changed_rows(delta, start, None) == [3, 17, 41]
    assert changed_rows(delta, start, before=delta.clone()) == []  # exactly the previous round's step: momentum


def test_a_dense_update_gives_away_the_rows_that_leave_the_shared_directions():
    """A table tied to the head: every row moves, those of tokens not in the batch as mixtures of the same few
    directions (the final hidden states), a batch token's row with a direction of its own; masked words: no bag."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(600, 128, generator=g)
    # Adam's first step on every row: the sign of a mixture of a few shared directions; a batch row's own direction
    delta = torch.sign(torch.randn(600, 4, generator=g) @ torch.randn(4, 128, generator=g))
    batch = [5, 77, 140, 333, 512]
    delta[batch] = torch.sign(torch.randn(len(batch), 128, generator=g))
    assert changed_rows(delta, start, None) == batch
    masked = torch.randint(-2**62, 2**62, (600, 128), generator=g).double() / 2**32  # ring words read as numbers
    assert changed_rows(masked.float(), start, None) == []
