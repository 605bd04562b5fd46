"""A hundred simulated data owners in one process: every client's party on one copy of the frozen weights (what grows
with the clients is their adapters and optimizer state, not the model)."""

import pytest

from splittune.config import load_config
from splittune.models.partition import is_placeholder
from splittune.models.sharing import FrozenBank
from splittune.models.zoo import resolve_model
from splittune.run import connect

from configs import owners as owners_file, tiny

MANY = tiny("cuts=[1,3]", "clients=100", "clients_per_round=10", "schedule=sfl-v2", "train.steps=3", "train.lr=0.01",
            "train.warmup_steps=0")


@pytest.fixture(scope="module")
def owners(tmp_path_factory):
    """Two hundred short documents: two for each of a hundred data owners (one held out)."""
    return [*MANY, f"data.source={owners_file(tmp_path_factory.mktemp('owners') / 'owners.jsonl')}"]


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


@pytest.mark.parametrize("shared", [True, False])
def test_the_clients_hold_one_copy_of_the_frozen_weights(monkeypatch, shared, owners):
    if not shared:  # the twin: without the bank every client holds a copy
        monkeypatch.setattr(FrozenBank, "share", lambda self, model, fingerprint: 0)
    cfg = load_config(None, owners)
    source = resolve_model(cfg.model)
    fleet = connect(cfg, source, [4] * 100)  # (the run itself, on Ray workers and in-process: tests/engines/test_ray.py)
    try:
        unique, total = held(fleet)
    finally:
        fleet.close()
    one = total // 100
    assert one > 0 and unique == (one if shared else total)
