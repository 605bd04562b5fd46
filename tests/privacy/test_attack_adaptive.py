"""Every learned attack is adaptive: it trains through the client's announced defenses, those on what crosses (the
chain's slot) and those inside the bottom (on its embeddings, replayed from the defense registry on the public
bottom), and it says which it could not replay. The twin: the naive attacker, trained without them, reads less."""

from __future__ import annotations

import pytest
import torch

from splittune.config import load_config
from splittune.privacy.attacks.adaptive import replayed_bottom
from splittune.privacy.attacks.base import REGISTRY, run_attack
from splittune.privacy.attacks.inversion import Inversion
from splittune.privacy.attacks.optimization import Optimization
from splittune.privacy.judge import score
from splittune.privacy.knowledge import PublicKnowledge
from splittune.run import train
from splittune.taps.tap import Tap, Truth
from configs import SMALL, small

DX = {"name": "dx", "epsilon": 100.0, "snap": False}  # noise of 0.64 per token against embeddings of norm 0.16
FAST = {"aux_rows": 48, "random_rows": 16, "epochs": 3}  # measured: 0.31 token accuracy adaptive, 0.15 naive


@pytest.fixture(scope="module")
def defended(tmp_path_factory):
    out = tmp_path_factory.mktemp("dx") / "run"
    train(load_config(None, small("train.steps=2", "train.seq_len=32", "data.max_train_examples=16",
                                  "defense=[{name: dx, epsilon: 100}]", "defense_seed=1")), out, record_tap=("server",))
    return Tap.open(out / "tap" / "server"), Truth.open(out / "tap" / "truth")


@pytest.fixture(scope="module")
def public():
    return PublicKnowledge(SMALL, aux="builtin:sentiment")


def test_every_learned_attack_is_adaptive_by_default():
    learned = {name for name, cls in REGISTRY.items() if cls.learns}
    assert {"inversion", "optimization", "generation-inversion"} <= learned
    for name in learned:
        assert REGISTRY[name]().adaptive is True, name
    assert Inversion({"adaptive": False}).adaptive is False  # the naive attacker exists, for the twin below
    assert Optimization({"inversion": {"adaptive": False}}).adaptive is False
    assert all(REGISTRY[n]().adaptive is None for n in REGISTRY if n not in learned)  # nothing learned, nothing to adapt


def test_the_inverter_trained_through_an_in_bottom_defense_reads_more(defended, public):
    tap, truth = defended
    result = {}
    for adaptive in (True, False):
        recovery = run_attack(Inversion({**FAST, "adaptive": adaptive}), tap, public)
        result[adaptive] = score(recovery, truth, public.tokenizer)["token_accuracy"]
        assert recovery.info["defenses"] == ([DX] if adaptive else [])
    assert result[True] > result[False] + 0.1, result
    chained = run_attack(Optimization({"iterations": 1, "inversion": {**FAST, "epochs": 0}}), tap, public)
    assert chained.info["defenses"] == [DX]  # BiSR's chain starts from the adaptive inverter


def test_the_replay_hooks_the_public_bottom_and_names_what_it_cannot_replay(public):
    bottom = public.segment(0, 1)
    ids = torch.arange(3, 19)[None]
    mask = torch.ones_like(ids)
    clean = bottom(mask, input_ids=ids)
    proposal = {"defenses": [DX, {"name": "nopeek", "alpha": 1.0}, {"name": "blur"}]}
    with torch.no_grad(), replayed_bottom(bottom, proposal, seed=0) as replay:
        first, second = bottom(mask, input_ids=ids), bottom(mask, input_ids=ids)
    assert replay.replayed == [DX]
    assert set(replay.skipped) == {"nopeek", "blur"} and "nothing to replay" in replay.skipped["nopeek"]
    assert (first - clean).norm() > 0.1 * clean.norm() and not torch.equal(first, second)  # fresh noise each forward
    with torch.no_grad(), replayed_bottom(bottom, proposal, seed=0, enabled=False) as naive:
        assert torch.equal(bottom(mask, input_ids=ids), clean) and naive.replayed == []
    assert torch.equal(bottom(mask, input_ids=ids), clean)  # the hook is gone
