"""Secure aggregation in a run: the average equals the plain one, the aggregator's tap holds only masked words, the
aggregator attack that reads a plain update fails on them, and a client that drops after masking leaves the
survivors' exact average. (The protocol math itself: tests/dpmath/test_secagg.py.)"""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from splittune.config import ConfigError, load_config
from splittune.models.zoo import resolve_model
from splittune.privacy.attacks.aggregator import AggregatorInversion, initial_adapters
from splittune.privacy.attacks.base import run_attack
from splittune.privacy.judge import score
from splittune.privacy.knowledge import PublicKnowledge
from splittune.taps.tap import Tap, Truth
from splittune.run import connect, train
from splittune.parties.secure import client_round
from configs import SMALL, small

MODEL = SMALL
SETS = small("clients=3", "schedule=sfl-v2", "aggregate_every=1", "train.steps=3", "train.seq_len=16", "train.lr=0.01",
             "data.max_train_examples=24")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    out = {}
    for name, extra in {"plain": [], "secure": ["secure_aggregation=true"]}.items():
        folder = tmp_path_factory.mktemp(name)
        summary = train(load_config(None, [*SETS, *extra]), folder, record_tap=("aggregator",))
        out[name] = (folder, summary)
    return out


def test_the_secure_average_is_the_plain_average(runs):
    (plain, a), (secure, b) = runs["plain"], runs["secure"]
    for name in ("global.safetensors",):
        x, y = load_file(plain / "adapters" / name), load_file(secure / "adapters" / name)
        assert set(x) == set(y)
        worst = max(float((x[k] - y[k]).abs().max()) for k in x)
        assert worst < 1e-6  # fixed point at 2^-32 resolution, cast back to float32: equal up to rounding
    assert b["eval_loss_after"] == pytest.approx(a["eval_loss_after"], abs=1e-5)
    assert b["sync_bytes_up"] > a["sync_bytes_up"]  # 64-bit ring words, keys and shares cost more than float32 adapters


def test_the_aggregator_sees_masked_words_only(runs):
    public = PublicKnowledge(MODEL)
    plain = Tap.open(runs["plain"][0] / "tap" / "aggregator")
    secure = Tap.open(runs["secure"][0] / "tap" / "aggregator")
    init, _ = initial_adapters(public, secure.proposal())  # the public LoRA init both runs start from
    name = next(k for k in init if k.endswith("lora_A.weight") and ".0." in k)
    masked = [r for r in secure.records("aggregate", "up") if r.step == 1]
    assert masked and all(r.meta.get("commit") for r in masked)
    words = torch.cat([r.tensor(name).flatten() for r in masked])
    assert words.dtype == torch.int64
    assert abs(float((words < 0).double().mean()) - 0.5) < 0.05  # a uniform 64-bit word's sign bit is a fair coin

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1])

    for r in masked:  # a masked A is unrelated to the A it hides, which one step barely moved from the init
        assert abs(corr(r.tensor(name).double() / 2**32, init[name])) < 0.2
    for r in [r for r in plain.records("aggregate", "up") if r.step == 1]:  # the twin: in the clear it is the init, nearly
        assert corr(r.tensor(name), init[name]) > 0.9


def test_the_aggregator_attack_fails_under_secure_aggregation(runs):
    public = PublicKnowledge(MODEL)
    f1 = {}
    for name, (folder, _) in runs.items():
        recovery = run_attack(AggregatorInversion(), Tap.open(folder / "tap" / "aggregator"), public)
        f1[name] = score(recovery, Truth.open(folder / "tap" / "truth"), public.tokenizer)["f1"]
    assert f1["plain"] > 0.3, f1  # a single plain update gives its tokens away
    assert f1["secure"] < 0.1, f1


def _drop_last_after_sharing(n):
    """An n-client secure average in which the last client shares its keys, then never sends its masked input;
    returns the fleet, the clients' updates and weights, and what each other client's round raised."""
    cfg = load_config(None, [f"model={MODEL}", f"clients={n}", "mode=federated", "secure_aggregation=true", "train.steps=1",
                             "train.batch_size=2", "train.seq_len=16"])
    weights = [4] * (n - 1) + [8]
    fleet = connect(cfg, resolve_model(MODEL), weights)
    fleet.server.group.meet.wait_s = 3.0  # the dropped client is given up after this long
    generator = torch.Generator().manual_seed(0)
    for client in fleet.clients:  # different updates
        client.party.load_state({k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in client.party.state().items()})
    states = [c.party.state() for c in fleet.clients]

    class Dropped(Exception):
        pass

    def vanish(kind, *args, **meta):
        if kind == "aggregate":
            raise Dropped
        return fleet.clients[n - 1]._call(kind, *args, **meta)

    errors = {}

    def run(i):
        try:
            if i == n - 1:
                client_round(vanish, i, n, 1, states[i], weights[i])
            else:
                fleet.clients[i].aggregate(1)
        except Dropped:
            pass
        except Exception as err:  # noqa: BLE001
            errors[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return fleet, states, weights, errors


def test_a_client_that_drops_after_masking_leaves_the_survivors_exact_average():
    fleet, states, weights, errors = _drop_last_after_sharing(4)  # three survivors still hide each other's updates
    assert not errors, errors
    assert fleet.server.group.dropped == {3}
    expected = {k: sum(weights[i] * states[i][k].double() for i in range(3)) / 12 for k in states[0]}
    for i in range(3):
        got = fleet.clients[i].party.state()
        assert max(float((got[k].double() - expected[k]).abs().max()) for k in expected) < 1e-7
    with_dropped = {k: sum(weights[i] * states[i][k] for i in range(4)) / 20 for k in states[0]}
    assert max(float((fleet.clients[0].party.state()[k] - with_dropped[k]).abs().max()) for k in expected) > 1e-3  # the twin
    fleet.close()


def test_a_round_left_with_two_survivors_is_called_off_and_both_are_told():
    fleet, states, _, errors = _drop_last_after_sharing(3)
    assert sorted(errors) == [0, 1]  # never a quiet average of two, from which each could read the other's update
    for err in errors.values():
        assert err.code == "ABORTED"
        assert ("secure aggregation at step 1 is called off: client 2 dropped out, leaving 2 (0, 1), fewer than the 3 whose "
                "sum keeps each update hidden") in str(err)
    for i in (0, 1):  # and nothing was averaged
        assert all(torch.equal(fleet.clients[i].party.state()[k], states[i][k]) for k in states[i])
    fleet.close()


@pytest.mark.parametrize("sets, fragment", [
    (["clients=3", "client_overrides={1: {lora: {rank: 2}}}"], "same cuts and LoRA rank"),
    (["clients=3", "schedule=sequential"], "averages nothing"),
    (["clients=1"], "averages nothing"),
])
def test_secure_aggregation_refuses_what_it_cannot_sum(sets, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [f"model={MODEL}", "secure_aggregation=true", *sets])
