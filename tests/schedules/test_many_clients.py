"""A hundred simulated data owners in one process: ten sampled a round, and every client's party on one copy of the
frozen weights (what grows with the clients is their adapters and optimizer state, not the model)."""

import json

import pytest

from splittune.config import load_config
from splittune.models.partition import is_placeholder
from splittune.models.sharing import FrozenBank
from splittune.models.zoo import resolve_model
from splittune.run import connect, train
from splittune.schedules.sampling import Roster

from configs import tiny

MANY = tiny("cuts=[1,3]", "clients=100", "clients_per_round=10", "schedule=sfl-v2", "train.steps=3", "train.lr=0.01",
            "train.warmup_steps=0")
WORDS = "the quick brown fox jumps over a lazy dog while seven owners keep their text at home".split()


@pytest.fixture(scope="module")
def owners(tmp_path_factory):
    """Two hundred short documents: two for each of a hundred data owners (one held out)."""
    path = tmp_path_factory.mktemp("owners") / "owners.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(30))}) + "\n"
                            for i in range(200)))
    return [*MANY, f"data.source={path}"]


def held(fleet) -> tuple[int, int]:
    """Bytes of frozen weights the clients hold, counting each storage once; and what they would hold unshared."""
    seen, unique, total = set(), 0, 0
    for client in fleet.clients:
        for name, p in client.party.model.named_parameters():
            if p.requires_grad or "lora_" in name or is_placeholder(p):
                continue
            size = p.numel() * p.element_size()
            total += size
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                unique += size
    return unique, total


def test_a_hundred_clients_ten_a_round_train_on_one_frozen_base(tmp_path, owners):
    cfg = load_config(None, owners)
    summary = train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    roster = Roster(100, 10, cfg.seed)
    assert summary["sampled"] == [roster.of(r) for r in (1, 2, 3)]
    assert [sorted(r["client"] for r in rows if r["step"] == s) for s in (1, 2, 3)] == summary["sampled"]  # each its own data
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


@pytest.mark.parametrize("shared", [True, False])
def test_the_clients_hold_one_copy_of_the_frozen_weights(monkeypatch, shared, owners):
    if not shared:  # the twin: without the bank every client holds a copy
        monkeypatch.setattr(FrozenBank, "share", lambda self, model, fingerprint: 0)
    cfg = load_config(None, owners)
    source = resolve_model(cfg.model)
    fleet = connect(cfg, source, [4] * 100)
    try:
        unique, total = held(fleet)
    finally:
        fleet.close()
    one = total // 100
    assert one > 0 and unique == (one if shared else total)
