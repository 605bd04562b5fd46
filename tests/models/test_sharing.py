"""Frozen weights shared between the runs of one server: one copy, and a run's fold stays its own."""

from dataclasses import replace

import pytest
import torch

import splittune.parties.party as party_module
from splittune.config import load_config
from splittune.models.adapters import lora_layers
from splittune.models.arch import detect_arch
from splittune.models.sharing import FrozenBank
from splittune.models.zoo import resolve_model
from splittune.parties.party import Party, SessionSpec

from configs import tiny


def _two_parties():
    source = resolve_model("tiny:llama")
    spec = SessionSpec.from_run(load_config(None, tiny("cuts=[1,3]")), source.fingerprint(), "llama")
    bank = FrozenBank()
    parties = [Party("server", source, detect_arch(source.config()), replace(spec, seed=s), source.config()) for s in (1, 2)]
    saved = [bank.share(p.model, source.fingerprint()) for p in parties]
    return parties, saved


@pytest.mark.parametrize("private_copy", [True, False])
def test_a_fold_into_a_shared_base_weight_stays_with_its_run(monkeypatch, private_copy):
    if not private_copy:  # the twin: without the private copy, one run's fold would reach the other's base weight
        monkeypatch.setattr(party_module, "own", lambda param: None)
    (a, b), saved = _two_parties()
    assert saved[0] == 0 and saved[1] > 0  # the second party points at the first's frozen tensors
    module = next(iter(lora_layers(a.model)))
    before = lora_layers(b.model)[module].get_base_layer().weight.detach().clone()
    shape = lora_layers(a.model)[module].get_base_layer().weight.shape
    a.fold(module, torch.ones(shape))
    after = lora_layers(b.model)[module].get_base_layer().weight
    assert torch.equal(after, before) is private_copy
    assert torch.equal(lora_layers(a.model)[module].get_base_layer().weight, before + 1)
