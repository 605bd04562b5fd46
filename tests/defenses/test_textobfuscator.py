"""TextObfuscator: k-means prototypes of the embedding table, embeddings pulled to them with noise within the
cluster, what the server's tap holds (nothing changed when off), and an attacker who can rebuild it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from splittune.config import ConfigError, load_config
from splittune.defenses import Placement
from splittune.defenses.textobfuscator import TextObfuscator, clusters, obfuscate
from splittune.privacy.attacks.base import run_attack
from splittune.privacy.attacks.inversion import Inversion
from splittune.privacy.knowledge import PublicKnowledge
from splittune.run import build, train
from splittune.taps.tap import Tap

from configs import SMALLEST, small

BASE = small(f"model={SMALLEST}", "train.steps=2", "train.seq_len=16", "data.max_documents=2", "data.max_train_examples=8")
ON = "defense=[{name: textobfuscator, clusters: 8, pull: 1.0, noise: 0.5}]"


def _run(tmp_path, name, *sets):
    out = tmp_path / name
    return out, train(load_config(None, [*BASE, *sets]), out, record_tap=("server",))


def activations(out, step=1) -> list[torch.Tensor]:
    tap = Tap.open(out / "tap" / "server")
    return [r.tensor("hidden") for r in tap.records("activations", "up") if r.meta.get("train") and r.step == step]


def test_the_prototypes_are_a_k_means_of_the_table_and_a_cluster_shares_one_input():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=g) * 10
    table = (centres[:, None, :] + 0.1 * torch.randn(4, 5, 6, generator=g)).reshape(20, 6)  # 4 tight groups of 5
    protos, assign, radius = found = clusters(table, 4, seed=1)
    assert clusters(table, 4, seed=1)[0] is protos  # cached: computed once
    assert len({tuple(assign[i * 5:(i + 1) * 5].tolist()) for i in range(4)}) == 4  # each group is one cluster
    assert all(len(set(assign[i * 5:(i + 1) * 5].tolist())) == 1 for i in range(4))
    for c in range(4):
        members = table[assign == c]
        assert torch.allclose(protos[c], members.mean(0), atol=1e-5)
        assert float(radius[c]) == pytest.approx(float((members - protos[c]).norm(dim=-1).mean()), rel=1e-5)
    pulled = obfuscate(table, found, 1.0, 0.0, g)
    assert torch.equal(pulled[0], pulled[4]) and torch.equal(pulled[0], protos[assign[0]])  # one input per cluster
    assert torch.allclose(obfuscate(table, found, 0.5, 0.0, g), 0.5 * (table + protos[assign]), atol=1e-5)
    noised = obfuscate(table, found, 1.0, 2.0, g)
    assert float((noised - pulled).norm(dim=-1).mean()) == pytest.approx(2 * float(radius.mean()), rel=0.5)
    assert torch.equal(obfuscate(table, found, 0.0, 0.0, g), table)  # the twin: no pull, no noise: the table itself


def test_the_obfuscated_embeddings_are_what_the_server_sees_and_nothing_when_off(tmp_path):
    clean_out, clean = _run(tmp_path, "clean", "cuts=[1]", "codec.up=int8", "train.micro_batches=2")
    out, summary = _run(tmp_path, "on", "cuts=[1]", "codec.up=int8", "train.micro_batches=2", ON, "defense_seed=1")
    assert all(not torch.allclose(a, b, atol=1e-2) for a, b in zip(activations(clean_out), activations(out), strict=True))
    assert summary["privacy"]["textobfuscator"] == {"clusters": 8, "pull": 1.0, "noise": 0.5}
    off_out, off = _run(tmp_path, "off", "cuts=[1]", "codec.up=int8", "train.micro_batches=2",
                        "defense=[{name: textobfuscator, pull: 0.0, noise: 0.0}]")
    assert all(torch.equal(a, b) for a, b in zip(activations(clean_out, 2), activations(off_out, 2), strict=True))
    assert off["train_loss_last"] == clean["train_loss_last"] and off["eval_loss_after"] == clean["eval_loss_after"]
    with pytest.raises(ConfigError, match="defense.0.textobfuscator.pull"):
        load_config(None, [*BASE, "defense=[{name: textobfuscator, pull: 2}]"])


def test_an_attacker_rebuilds_the_defense_from_the_public_bottom_and_the_attack_runs_through_it(tmp_path):
    """Everything but the noise is public: built on the public bottom (as an adaptive attacker does), it moves every
    token exactly as the client's does; the attack then runs on the defended tap, the defense announced."""
    out, _ = _run(tmp_path, "on", ON, "defense_seed=1")  # the U-shape of small()
    tap = Tap.open(out / "tap" / "server")
    entry = {"name": "textobfuscator", "clusters": 8, "pull": 1.0, "noise": 0.5, "seed": 0}
    assert tap.proposal()["defenses"] == [entry]
    public = PublicKnowledge(SMALLEST, aux="builtin:sentiment")
    client = build(load_config(None, [*BASE, ON]))[0]
    quiet = TextObfuscator.Settings.model_validate({**entry, "noise": 0.0})
    mine = TextObfuscator.create(quiet, Placement(client.party, 1))
    theirs = TextObfuscator.create(quiet, Placement(SimpleNamespace(model=public.segment(0, 1).model), 99))
    ids = torch.randint(0, 320, (2, 16))
    embeds = client.party.model.get_input_embeddings()(ids)
    assert torch.equal(mine.embeddings(embeds, 1, 0), theirs.embeddings(embeds, 0, 0))
    assert not torch.equal(mine.embeddings(embeds, 1, 0), embeds)
    recovery = run_attack(Inversion({"aux_rows": 8, "random_rows": 4, "epochs": 1, "model": "linear"}), tap, public)
    assert recovery.items and recovery.target == "inputs"
