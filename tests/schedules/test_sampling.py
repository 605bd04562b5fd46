"""Client sampling (``clients_per_round``): every client sampled is the unsampled run bit for bit, sampled sfl-v1
equals sampled FedAvg, each round trains exactly its drawn clients at the run's learning rate, a resumed sampled run
is exact, and the server refuses a client its round did not sample."""

import json

import pytest
import torch
from safetensors.torch import load_file

from splittune.channels.base import RemoteError
from splittune.config import ConfigError, load_config
from splittune.models.zoo import resolve_model
from splittune.run import connect, train
from splittune.schedules.sampling import Roster
from configs import tiny
from interrupt import killed_then_resumed

RUN = tiny("cuts=[1,3]", "train.steps=4", "data.max_documents=12", "train.lr=0.01", "train.warmup_steps=0", "clients=4",
           "aggregate_every=2")


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steady(out):
    """Each step's row without its timings."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows(out)]


def adapters(out):
    return {f.name: load_file(f) for f in sorted((out / "adapters").glob("*.safetensors"))}


def same(a, b):
    assert a.keys() == b.keys()
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a.values(), b.values()))


def test_the_roster_is_drawn_from_the_seed_alone_and_reaches_every_client():
    r = Roster(10, 3, seed=7)
    assert r.of(1) == Roster(10, 3, seed=7).of(1) and len(r.of(1)) == 3 and r.of(1) == sorted(r.of(1))
    assert r.of(1) != Roster(10, 3, seed=8).of(1) or r.of(2) != Roster(10, 3, seed=8).of(2)
    assert set().union(*(r.of(k) for k in range(1, 40))) == set(range(10))  # uniform draws reach everyone
    assert Roster(10, None).of(5) == list(range(10)) and not Roster(4, 4).samples
    assert r.at(1, 2) == r.at(2, 2) == r.of(1) and r.at(3, 2) == r.of(2)  # a round is aggregate_every steps


@pytest.mark.parametrize("schedule", ["schedule=sfl-v2", "schedule=sfl-v1", "schedule=sequential", "mode=federated"])
def test_sampling_every_client_is_the_unsampled_run_and_sampling_fewer_is_not(tmp_path, schedule):
    whole = train(load_config(None, [*RUN, schedule]), tmp_path / "all")
    every = train(load_config(None, [*RUN, schedule, "clients_per_round=4"]), tmp_path / "every")
    assert steady(tmp_path / "all") == steady(tmp_path / "every")
    assert same(adapters(tmp_path / "all"), adapters(tmp_path / "every")) and whole["bytes_up"] == every["bytes_up"]
    assert "sampled" not in every
    if schedule not in ("schedule=sfl-v2", "schedule=sequential"):
        return  # (sampled sfl-v1 and FedAvg runs are checked against each other below)
    half = train(load_config(None, [*RUN, schedule, "clients_per_round=0.5"]), tmp_path / "half")  # the twin
    assert half["sampled"] == [Roster(4, 2).of(1), Roster(4, 2).of(2)] and half["clients_per_round"] == 2
    assert not same(adapters(tmp_path / "all"), adapters(tmp_path / "half"))


def test_each_round_trains_its_drawn_clients_at_the_runs_learning_rate(tmp_path):
    summary = train(load_config(None, [*RUN, "clients_per_round=2", "train.steps=6", "train.warmup_steps=1"]), tmp_path / "run")
    got = rows(tmp_path / "run")
    for r, drawn in enumerate(summary["sampled"], start=1):
        mine = [x for x in got if (x["step"] - 1) // 2 + 1 == r]
        assert sorted({x["client"] for x in mine}) == drawn and len(mine) == 2 * len(drawn)
    by_step = {}
    for x in got:
        by_step.setdefault(x["step"], set()).add(x["lr"])
    assert all(len(lrs) == 1 for lrs in by_step.values())  # a client back from a skipped round is at the run's step
    train(load_config(None, [*RUN, "train.steps=6", "train.warmup_steps=1"]), tmp_path / "full")
    full = rows(tmp_path / "full")
    assert [next(iter(by_step[s])) for s in sorted(by_step)] == [next(x["lr"] for x in full if x["step"] == s) for s in sorted(by_step)]


def test_sampled_sfl_v1_equals_sampled_fedavg(tmp_path):
    """A two-part sfl-v1 run trains, per client, the very model FedAvg does (one server adapter per client, averaged
    with it); sampling the same clients keeps them equal."""
    a = train(load_config(None, [*RUN, "cuts=[2]", "schedule=sfl-v1", "clients_per_round=2"]), tmp_path / "v1")
    b = train(load_config(None, [*RUN, "mode=federated", "clients_per_round=2"]), tmp_path / "fed")
    assert [r["loss"] for r in rows(tmp_path / "v1")] == [r["loss"] for r in rows(tmp_path / "fed")]
    assert a["eval_loss_after"] == b["eval_loss_after"] and a["sampled"] == b["sampled"]


def test_a_sampled_run_resumes_exactly_mid_round(tmp_path, monkeypatch):
    cfg = load_config(None, [*RUN, "clients_per_round=2", "train.steps=6", "train.checkpoint_every=3"])
    train(cfg, tmp_path / "whole")
    killed_then_resumed(monkeypatch, 5, lambda: train(cfg, tmp_path / "cut"))
    key = lambda r: (r["step"], r["client"], r["loss"], r["lr"], r["bytes_up"])  # noqa: E731
    assert [key(r) for r in rows(tmp_path / "whole")] == [key(r) for r in rows(tmp_path / "cut")]
    assert same(adapters(tmp_path / "whole"), adapters(tmp_path / "cut"))


def test_the_server_refuses_a_client_its_round_did_not_sample():
    cfg = load_config(None, [*RUN, "clients_per_round=2"])
    fleet = connect(cfg, resolve_model(cfg.model), [3, 3, 3, 3])
    try:
        left_out = next(i for i in range(4) if i not in Roster(4, 2).of(1))
        ids = torch.randint(3, 200, (2, 8))
        with pytest.raises(RemoteError, match=rf"client {left_out} sent a activations message for step 1, but its round "
                                               rf"sampled clients \[\d, \d\] \(clients_per_round\)"):
            fleet.clients[left_out].train_step(1, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}])
    finally:
        fleet.close()


@pytest.mark.parametrize("sets, message", [
    (["clients=3", "clients_per_round=5"], "clients_per_round=5 exceeds clients=3"),
    (["clients=3", "clients_per_round=1.5"], "must be an integer >= 1 or a fraction in"),
    (["clients=3", "clients_per_round=2", "mode=centralized"], "mode: centralized pools their data"),
    (["clients=3", "clients_per_round=2", "secure_aggregation=true"], "secure_aggregation's pairwise masks"),
    (["clients=3", "clients_per_round=2", "client_overrides={1: {lora: {rank: 2}}}"], "clients of other LoRA ranks"),
])
def test_sampling_settings_that_cannot_work_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, tiny(*sets))


def test_dp_sgd_accounts_for_the_steps_a_sampled_client_takes(tmp_path):
    summary = train(load_config(None, [*RUN, "mode=federated", "clients_per_round=2", "dp_sgd={noise_multiplier: 0.8}"]),
                    tmp_path / "run")
    mine = [r for r in rows(tmp_path / "run") if r["client"] == 0]
    assert summary["privacy"]["dp_sgd"]["steps"] == len(mine) == 2  # 2 of the run's 4 steps: client 0 sits a round out
