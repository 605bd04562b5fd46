"""Many clients: each schedule against a reference it must equal, FedAvg and rank-heterogeneous averages
checked by hand, personal segments, per-client outputs and the errors users meet."""

import json

import pytest
import torch
from safetensors.torch import load_file

from splittune.config import ConfigError, load_config
from splittune.data import build_client_tasks
from splittune.models.adapters import lora_layers
from splittune.models.zoo import resolve_model
from splittune.run import build, connect, parallel, train
from configs import tiny

TINY = tiny("cuts=[1,3]", "train.steps=4", "data.max_documents=8", "train.lr=0.01", "train.warmup_steps=1",
            "train.max_grad_norm=0.5")


def losses(out, client=None):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if client is None or r["client"] == client]


def same_source(tmp_path, n):
    """Every client gets the same data: one local text file named by each client's override."""
    path = tmp_path / "shared.txt"
    path.write_text("\n\n".join(f"Document {i}: " + "the quick brown fox jumps over the lazy dog " * (20 + i) for i in range(6)))
    overrides = ", ".join(f"{{data: {path}}}" for _ in range(n))
    return ["partition=by_source", f"client_overrides=[{overrides}]", f"data.source={path}"]


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_sequential_equals_centralized_on_the_same_sample_order(tmp_path):
    """Vanilla split learning relays the client-side model (and its optimizer) from client to client:
    three clients taking turns are one centralized run over the batches in the order they were used."""
    n, steps = 3, 4
    cfg = load_config(None, [*TINY, f"clients={n}", "schedule=sequential", "aggregate_every=2", "cuts=[1,3]",
                             f"train.steps={steps}"])
    summary = train(cfg, tmp_path / "seq")
    rows = [json.loads(line) for line in (tmp_path / "seq" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["client"], r["step"]) for r in rows] == [(c, t) for span in ((1, 2), (3, 4)) for c in range(n) for t in span]

    tasks = build_client_tasks(cfg, resolve_model(cfg.model).tokenizer())
    samplers = [iter(t.sampler(cfg.train.batch_size, cfg.seed)) for t in tasks]
    central_cfg = load_config(None, [*TINY, "mode=centralized", "cuts=[1,3]", f"train.steps={n * steps}"])
    torch.manual_seed(cfg.seed)
    client, _, _, _ = build(central_cfg)
    ref = []
    for k, r in enumerate(rows, start=1):
        task = tasks[r["client"]]
        batch = task.collate([task.train[i] for i in next(samplers[r["client"]])])
        ref.append(client.train_step(k, [batch]).loss)
    assert [r["loss"] for r in rows] == pytest.approx(ref, abs=1e-5)
    final = {**load_file(tmp_path / "seq/adapters/client.safetensors"), **load_file(tmp_path / "seq/adapters/server.safetensors")}
    assert max_diff(final, client.party.state()) < 1e-5
    assert summary["schedule"] == "sequential" and summary["clients"] == n
    assert summary["sync_bytes_up"] > 0  # the relays crossed the wire


@pytest.mark.parametrize("cuts", [[1, 3], [2]], ids=["u-shape", "two-part"])
def test_sfl_v1_with_identical_clients_equals_one_client(tmp_path, cuts):
    """Three identical clients with identical data, batched through one base with three server-side
    adapters and averaged every step, train exactly like a single client (sfl-v2 with one client)."""
    base = [*TINY, f"cuts={cuts}", "train.grad_accum=2", *same_source(tmp_path, 3)]
    one = load_config(None, [*base[:-3], f"data.source={tmp_path / 'shared.txt'}"])
    train(one, tmp_path / "one")
    three = load_config(None, [*base, "clients=3", "schedule=sfl-v1"])
    summary = train(three, tmp_path / "three")
    single = losses(tmp_path / "one")
    for c in range(3):
        assert losses(tmp_path / "three", c) == pytest.approx(single, abs=1e-5)
    ref = {**load_file(tmp_path / "one/adapters/client.safetensors"), **load_file(tmp_path / "one/adapters/server.safetensors")}
    assert max_diff(load_file(tmp_path / "three/adapters/global.safetensors"), ref) < 1e-5
    assert summary["eval_loss_after"] == pytest.approx(json.loads((tmp_path / "one/summary.json").read_text())["eval_loss_after"], abs=1e-5)


def test_sfl_v2_with_one_client_equals_the_single_client_run(tmp_path):
    a = train(load_config(None, [*TINY, "cuts=[1,3]"]), tmp_path / "a")
    b = train(load_config(None, [*TINY, "cuts=[1,3]", "schedule=sfl-v2", "clients=1"]), tmp_path / "b")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert a["eval_loss_after"] == b["eval_loss_after"] and a["bytes_up"] == b["bytes_up"]


def _fleet(tmp_path, *overrides, samples=(1, 3)):
    cfg = load_config(None, [*TINY, f"clients={len(samples)}", "train.warmup_steps=0", *overrides])
    source = resolve_model(cfg.model)
    fleet = connect(cfg, source, list(samples))
    task = build_client_tasks(load_config(None, TINY), source.tokenizer())[0]
    # different data per client (different updates), all at once as sfl-v1 needs
    parallel(lambda i: fleet.clients[i].train_step(1, [task.collate(task.train[2 * i : 2 * i + 2])]), list(range(len(samples))))
    return cfg, fleet


@pytest.mark.parametrize("schedule", ["sfl-v1", "sfl-v2"])
def test_fedavg_is_the_sample_weighted_mean(tmp_path, schedule):
    cfg, fleet = _fleet(tmp_path, "cuts=[1,3]", f"schedule={schedule}")
    server = fleet.server
    own = [c.party.state() for c in fleet.clients]
    on_server = [server.group.on_behalf(server.group.members[i]) for i in range(2)]
    parallel(lambda c: c.aggregate(1), fleet.clients)
    for name in own[0]:
        expected = (1 * own[0][name].double() + 3 * own[1][name].double()) / 4
        for c in fleet.clients:
            assert torch.allclose(c.party.state()[name].double(), expected, atol=1e-7), name
    for name in on_server[0]:  # sfl-v1: the per-client server adapters too; sfl-v2: one shared, unchanged
        expected = (1 * on_server[0][name].double() + 3 * on_server[1][name].double()) / 4
        for i in range(2):
            assert torch.allclose(server.group.on_behalf(server.group.members[i])[name].double(), expected, atol=1e-7)
    assert not torch.equal(own[0][next(k for k in own[0] if "lora_B" in k)], own[1][next(k for k in own[1] if "lora_B" in k)])
    alone = build(load_config(None, [*TINY, "cuts=[1,3]"]))[1].party
    assert server.party.weights.params == alone.weights.params  # one base for every client, never a copy
    assert server.party.trainable_params == (2 if schedule == "sfl-v1" else 1) * alone.trainable_params


def test_heterogeneous_clients_average_the_products_exactly(tmp_path):
    """Client 0 keeps blocks [0,1) at rank 2, client 1 blocks [0,2) at rank 8 (the server's rank is 4 and it
    runs block 1 for client 0): after the average every holder of every module has the same effective
    weight, W + Σ w_i s_i B_i A_i, computed here densely from what each trained."""
    cfg, fleet = _fleet(tmp_path, "cuts=[2,3]", "lora.rank=4", "schedule=sfl-v1",
                        "client_overrides={0: {cuts: [1,3], lora: {rank: 2}}, 1: {lora: {rank: 8}}}")
    group = fleet.server.group
    alpha = cfg.lora.alpha
    contributions = []
    for i, client in enumerate(fleet.clients):
        contributions.append({**client.party.state(), **group.on_behalf(group.members[i])})
    weights = [0.25, 0.75]

    def holders():
        for i, client in enumerate(fleet.clients):
            yield f"client {i}", client.party, client.party.adapter
        for i in range(2):
            yield f"server for {i}", fleet.server.party, group.members[i].adapter

    def effective(party, adapter, module):
        layer = lora_layers(party.model)[module]
        w = layer.get_base_layer().weight.detach().double()
        a, b = layer.lora_A[adapter].weight.double(), layer.lora_B[adapter].weight.double()
        return w + (alpha / a.shape[0]) * (b @ a)

    modules = {k.removesuffix(".lora_A.weight") for c in contributions for k in c if k.endswith("lora_A.weight")}
    base = {m: next(lora_layers(p.model)[m].get_base_layer().weight.detach().double().clone()
                    for _, p, _ in holders() if m in lora_layers(p.model)) for m in modules}
    expected = {}
    for m in modules:
        delta = sum(w * (alpha / c[f"{m}.lora_A.weight"].shape[0]) * (c[f"{m}.lora_B.weight"].double() @ c[f"{m}.lora_A.weight"].double())
                    for w, c in zip(weights, contributions))
        expected[m] = base[m] + delta
    parallel(lambda c: c.aggregate(1), fleet.clients)
    block1 = "model.layers.1.self_attn.q_proj"
    assert block1 in modules and lora_layers(fleet.clients[1].party.model).get(block1) is not None
    checked = 0
    for who, party, adapter in holders():
        for m in modules & set(lora_layers(party.model)):
            if who.startswith("server") and not group._serves(group.members[int(who[-1])], f"{m}.lora_A.weight"):
                continue
            assert torch.allclose(effective(party, adapter, m), expected[m], atol=1e-6), (who, m)
            checked += 1
    assert checked >= 6
    assert set(group.folded) >= {block1}  # ranks differed: the update went into the base weights


def test_personal_segments_stay_with_their_client(tmp_path):
    cfg, fleet = _fleet(tmp_path, "cuts=[1,3]", "schedule=sfl-v2", "personal=[bottom]")
    before = [c.party.state() for c in fleet.clients]
    parallel(lambda c: c.aggregate(1), fleet.clients)
    for i, c in enumerate(fleet.clients):
        after = c.party.state()
        for name, value in after.items():
            if name.startswith("model.layers.0."):
                assert torch.equal(value, before[i][name])  # bottom: personal, untouched
            else:
                assert torch.allclose(value.double(), (before[0][name].double() + 3 * before[1][name].double()) / 4, atol=1e-7)


def _sources(tmp_path, kind):
    paths = []
    for k, word in enumerate(("alpha beta gamma ", "one two three four ")):
        if kind == "text":
            path = tmp_path / f"source{k}.txt"
            path.write_text("\n\n".join(f"{word * (15 + i)} end {i}" for i in range(6)))
        else:  # instructions of varying lengths: micro-batches of different widths per client
            path = tmp_path / f"source{k}.jsonl"
            path.write_text("\n".join(json.dumps({"prompt": word * (1 + i % 3 + k), "response": f"answer {i} " * (1 + i % 3)})
                                      for i in range(12)))
        paths.append(path)
    return paths


@pytest.mark.parametrize("kind", ["text", "instruction"])
@pytest.mark.parametrize("cuts", [[1, 3], [2]], ids=["u-shape", "two-part"])
def test_sfl_v1_routes_each_client_through_its_own_server_adapter(tmp_path, kind, cuts):
    """Two clients with different data share one batched forward; until they average (at the last step)
    each trains exactly as it would alone, so the rows must go through the right adapters."""
    texts = _sources(tmp_path, kind)
    steps = ["train.steps=3", "aggregate_every=3", f"cuts={cuts}", "train.seq_len=128"]
    alone = []
    for k, path in enumerate(texts):
        train(load_config(None, [*TINY, *steps, f"data.source={path}"]), tmp_path / f"alone{k}")
        alone.append(losses(tmp_path / f"alone{k}"))
    assert alone[0] != alone[1]
    train(load_config(None, [*TINY, *steps, "clients=2", "schedule=sfl-v1", "partition=by_source",
                             f"client_overrides=[{{data: {texts[0]}}}, {{data: {texts[1]}}}]"]), tmp_path / "both")
    for k in range(2):
        assert losses(tmp_path / "both", k) == pytest.approx(alone[k], abs=1e-5)


@torch.no_grad()
def _global_logits(client, batch):
    """The U-shaped model of one client: bottom here, trunk on the server, top here."""
    party, plan = client.party, client.plan
    bottom, top = plan.segment("bottom"), plan.segment("top")
    h = party.run(0, bottom.end, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).hidden
    reply = client._call("activations", 0, 0, {"hidden": h, "attention_mask": batch["attention_mask"]}, train=False)
    return party.run(top.start, top.end, hidden=reply.tensors["hidden"], attention_mask=batch["attention_mask"], want_logits=True).logits


def test_multi_client_run_directory_and_export(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import splittune.run.loop as runner  # where train looks them up
    from splittune.export import export_run

    kept = {}
    real_connect = runner.connect
    monkeypatch.setattr(runner, "connect", lambda *a, **k: kept.setdefault("fleet", real_connect(*a, **k)))
    out = tmp_path / "run"
    summary = train(load_config(None, [*TINY, "clients=2", "schedule=sfl-v1", "cuts=[1,3]", "aggregate_every=2",
                                       "train.eval_every=2", "client_overrides={1: {cuts: [2,3], lora: {rank: 2}}}"]), out)
    assert summary["clients"] == 2 and summary["schedule"] == "sfl-v1"
    assert [c["client"] for c in summary["per_client"]] == [0, 1]
    assert summary["per_client"][1]["lora_rank"] == 2 and summary["per_client"][1]["cuts"] == [2, 3]
    assert summary["train_examples"] == sum(c["samples"] for c in summary["per_client"])
    assert summary["bytes_up"] == sum(c["bytes_up"] for c in summary["per_client"])
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4]
    manifest = json.loads((out / "adapters/manifest.json").read_text())
    assert set(manifest["files"]) == {"global"} and set(manifest["clients"]) == {"0", "1"}

    info = export_run(out, tmp_path / "global")
    assert len(info["ranks"]) >= 2  # the folded modules were written at their exact rank
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(resolve_model("tiny:llama").path)),
                                      str(tmp_path / "global")).eval()
    batch = {"input_ids": torch.randint(3, 250, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    with torch.no_grad():
        exported = model(**batch).logits
        with model.disable_adapter():
            untouched = model(**batch).logits
    for client in kept["fleet"].clients:  # after the last average both clients hold the global model
        assert torch.allclose(_global_logits(client, batch), exported, atol=1e-4)
    assert not torch.allclose(untouched, exported, atol=1e-3)
    export_run(out, tmp_path / "c1", client=1)
    with pytest.raises(Exception, match="there is no client 5"):
        export_run(out, tmp_path / "c5", client=5)


def test_federated_baseline(tmp_path):
    one = train(load_config(None, [*TINY, "mode=federated"]), tmp_path / "f1")
    train(load_config(None, [*TINY, "mode=centralized"]), tmp_path / "c")
    assert losses(tmp_path / "f1") == pytest.approx(losses(tmp_path / "c"), abs=1e-6)
    assert one["bytes_up"] == 0  # one client: nothing to average
    two = train(load_config(None, [*TINY, "mode=federated", "clients=2", "aggregate_every=2"]), tmp_path / "f2")
    assert two["bytes_up"] == two["sync_bytes_up"] > 0  # only adapters travel
    assert two["eval_loss_after"] < two["eval_loss_before"]


def test_client_errors(tmp_path):
    with pytest.raises(ConfigError, match="clients: Input should be greater than or equal to 1"):
        load_config(None, ["clients=0"])
    with pytest.raises(ConfigError, match="partition_alpha: Input should be greater than 0"):
        load_config(None, ["partition_alpha=0"])
    with pytest.raises(Exception, match="client 1: .*cut"):
        train(load_config(None, [*TINY, "clients=2", "cuts=[1,3]", "client_overrides={1: {cuts: [1,9]}}"]), tmp_path / "x")
    with pytest.raises(Exception, match="clients=50"):
        train(load_config(None, [*TINY, "clients=50"]), tmp_path / "y")


def test_compare_runs_every_schedule_on_the_same_budget(tmp_path):
    from splittune.compare import ENTRIES, compare

    cfg = load_config(None, [*TINY, "clients=2", "train.steps=2"])
    results = compare(cfg, tmp_path / "cmp")
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert list(saved["entries"]) == list(ENTRIES) == list(results)
    assert results["centralized"]["steps"] == 4 and results["centralized"]["bytes_up"] == 0
    assert {results[k]["schedule"] for k in ENTRIES} == {"centralized", "federated", "sequential", "sfl-v1", "sfl-v2"}
    for name in ENTRIES:  # the same examples seen, so the curves end at the same x
        assert results[name]["curve"][-1]["examples"] == 2 * 2 * 2
        assert results[name]["train_examples"] == results["centralized"]["train_examples"]
    assert results["sfl-v1"]["bytes_up"] > results["federated"]["bytes_up"] > 0
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hetero = load_config(None, [*TINY, "clients=2", "train.steps=2", "client_overrides={1: {lora: {rank: 2}}}"])
    skipped = compare(hetero, tmp_path / "cmp2", entries=("sequential", "sfl-v2"))
    assert "same cuts and LoRA rank" in skipped["sequential"]["skipped"] and "eval_loss_after" in skipped["sfl-v2"]


def test_a_failing_client_does_not_leave_the_others_waiting(tmp_path, monkeypatch):
    """sfl-v1 batches every client's activations: when one client fails before sending, the server calls
    the round off, the others stop at once, and the run reports the failing client's error."""
    from splittune.parties.client.pipeline import Client

    real = Client.train_step

    def flaky(self, step, micro):
        if self.party.session.client == 1 and step == 2:
            raise RuntimeError("client 1 lost its disk")
        return real(self, step, micro)

    monkeypatch.setattr(Client, "train_step", flaky)
    cfg = load_config(None, [*TINY, "clients=2", "schedule=sfl-v1"])
    with pytest.raises(RuntimeError, match="client 1 lost its disk"):
        train(cfg, tmp_path / "run")


def test_server_refuses_what_it_cannot_serve(tmp_path):
    with pytest.raises(Exception, match="sfl-v1 keeps one server-side adapter per client; a segment trained in full"):
        train(load_config(None, [*TINY, "clients=2", "schedule=sfl-v1", "segments.trunk=full"]), tmp_path / "a")
    with pytest.raises(Exception, match="blocks move between client and server segments; those segments must train the same way"):
        train(load_config(None, [*TINY, "clients=2", "segments.bottom=frozen", "client_overrides={1: {cuts: [2,3]}}"]),
              tmp_path / "b")
    with pytest.raises(ConfigError, match="personal: trunk is the server's segment"):
        load_config(None, [*TINY, "clients=2", "personal=[trunk]"])
    with pytest.raises(ConfigError, match="sequential relays one client-side model"):
        load_config(None, [*TINY, "clients=2", "schedule=sequential", "client_overrides=[{lora: {rank: 2}}]"])


@pytest.mark.parametrize("cuts", [[1, 3], [2]], ids=["u-shape", "two-part"])
def test_sfl_v1_is_federated_learning_with_the_model_split(tmp_path, cuts):
    """sfl-v1 averages every adapter (client- and server-side) like FedAvg does, and the split is exact:
    the two must train identically, client by client, step by step."""
    common = [*TINY, f"cuts={cuts}", "clients=3", "aggregate_every=2", "partition=dirichlet", "partition_alpha=1.0",
              "data.max_documents=12"]
    split = train(load_config(None, [*common, "schedule=sfl-v1"]), tmp_path / "v1")
    fed = train(load_config(None, [*common, "mode=federated"]), tmp_path / "fed")
    for c in range(3):
        assert losses(tmp_path / "v1", c) == pytest.approx(losses(tmp_path / "fed", c), abs=1e-5)
    assert max_diff(load_file(tmp_path / "v1/adapters/global.safetensors"), load_file(tmp_path / "fed/adapters/global.safetensors")) < 1e-5
    assert split["eval_loss_after"] == pytest.approx(fed["eval_loss_after"], abs=1e-5)
    assert split["bytes_up"] > fed["bytes_up"] > 0  # the split pays activations; federated only adapters
