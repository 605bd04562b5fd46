"""Mixture-of-experts models: fused-expert checkpoints loaded per party, LoRA on experts, and the router's
auxiliary loss split exactly (each against transformers' own model, with a twin showing the check can fail)."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from splittune.channels import RemoteError
from splittune.config import ConfigError, load_config
from splittune.export import export_run
from splittune.models.adapters import AdapterError
from splittune.models.arch import detect_arch
from splittune.models.partition import load_party_model
from splittune.models.routing import RouterAux, RoutingError
from splittune.models.zoo import resolve_model
from splittune.parties import Client, Party, SessionSpec
from splittune.run import connect, train
from splittune.verify import make_batch, verify
from splittune.wire import Message

MOE = ["tiny:mixtral", "tiny:qwen3_moe"]
SHORT = ["train.steps=2", "train.seq_len=16", "train.batch_size=2", "data.max_documents=4", "train.eval_batches=1",
         "train.warmup_steps=0", "train.lr=0.02"]


@pytest.fixture(scope="module")
def with_router_loss(tmp_path_factory):
    """tiny:mixtral with the router loss on (output_router_logits), as many MoE fine-tuning configs have it."""
    out = tmp_path_factory.mktemp("moe") / "mixtral-router-loss"
    shutil.copytree(resolve_model("tiny:mixtral").path, out)
    config = json.loads((out / "config.json").read_text())
    config.update(output_router_logits=True, router_aux_loss_coef=0.5)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


@pytest.mark.parametrize("model", MOE)
def test_fused_experts_load_per_party_as_transformers_loads_them(model, reads):
    read = reads
    source = resolve_model(model)
    spec = detect_arch(source.config())
    party, _ = load_party_model(source, source.config(), spec, [1, 2], pre=False, post=False)
    assert any(".experts.0." in k for k in source.weight_map())  # the checkpoint stores experts one by one
    assert read and all(k.startswith(("model.layers.1.", "model.layers.2.")) for k in read)  # only its own blocks
    assert set(read) == {k for k in source.weight_map() if k.startswith(("model.layers.1.", "model.layers.2."))}
    whole = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).state_dict()
    mine = {k: v for k, v in party.state_dict().items() if k.startswith(("model.layers.1.", "model.layers.2."))}
    fused = [k for k, v in mine.items() if v.dim() == 3]
    assert fused  # stacked expert weights, made from many checkpoint tensors
    assert all(torch.equal(mine[k], whole[k]) for k in mine)


@pytest.mark.parametrize("cuts", [[2], [1, 3]], ids=["two-part", "u-shape"])
@pytest.mark.parametrize("model", MOE)
def test_lora_on_experts_is_exact(model, cuts):
    report = verify(load_config(None, [f"model={model}", f"cuts={cuts}", "lora.experts=true"]), batch=4, seq=12, padding=True)
    assert report.ok, report
    plain = verify(load_config(None, [f"model={model}", f"cuts={cuts}"]), batch=4, seq=12, padding=True)
    assert report.tensors > plain.tensors  # the experts' factors train too


def _centralized(model: str):
    source = resolve_model(model)
    spec = detect_arch(source.config())
    cfg = load_config(None, [f"model={model}", "mode=centralized"]).resolve(spec.n_blocks)
    return Client(Party("client", source, spec, SessionSpec.from_run(cfg, source.fingerprint(), spec.model_type), source.config()))


def test_the_router_loss_is_the_models_own(with_router_loss):
    batch = make_batch(320, 4, 12, True, 0)
    hf = AutoModelForCausalLM.from_pretrained(with_router_loss, dtype=torch.float32)
    with torch.no_grad():
        expected = hf(**batch)
        lm_only = hf(**batch, output_router_logits=False).loss
    loss, _ = _centralized(with_router_loss).backward(0, [batch])
    assert loss == pytest.approx(float(expected.loss), abs=1e-5)
    assert float(expected.loss) - float(lm_only) == pytest.approx(0.5 * float(expected.aux_loss), abs=1e-5)
    assert abs(loss - float(lm_only)) > 0.1  # the twin: the loss without the router's term is another number


@pytest.mark.parametrize("sets", [
    ["cuts=[2]"], ["cuts=[1,3]"], ["cuts=[0,3]"], ["cuts=[1,4]"],
    ["cuts=[1,3]", "train.micro_batches=2", "train.max_in_flight=2"],
    ["cuts=[2]", "train.server_gradient_checkpointing=true", "lora.experts=true"],
], ids=lambda s: " ".join(s))
def test_the_router_loss_splits_exactly(with_router_loss, sets):
    report = verify(load_config(None, [f"model={with_router_loss}", *sets]), batch=4, seq=12, padding=True)
    assert report.ok, report


def test_a_split_that_drops_the_trunks_router_sums_is_caught(with_router_loss, monkeypatch):
    from splittune.parties.server.engine import TrunkEngine

    real = TrunkEngine.forward

    def without_sums(self, key, *args):  # the trunk's routers never reach the loss
        out, _ = real(self, key, *args)
        if key in self.pending:
            self.pending[key].router = None
        return out, None

    monkeypatch.setattr(TrunkEngine, "forward", without_sums)
    report = verify(load_config(None, [f"model={with_router_loss}", "cuts=[1,3]"]), batch=4, seq=12, padding=True)
    assert not report.ok and report.loss_diff > 1e-3


def test_sfl_v1_with_the_router_loss_is_federated_learning(with_router_loss, tmp_path):
    common = [f"model={with_router_loss}", "cuts=[1,3]", "clients=2", *SHORT]
    split = train(load_config(None, [*common, "schedule=sfl-v1"]), tmp_path / "v1")
    fed = train(load_config(None, [*common, "mode=federated"]), tmp_path / "fed")
    rows = lambda out: [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "v1") == pytest.approx(rows(tmp_path / "fed"), abs=1e-5)
    assert split["eval_loss_after"] == pytest.approx(fed["eval_loss_after"], abs=1e-5)


def test_router_sums_are_checked_where_they_arrive(with_router_loss):
    cfg = load_config(None, ["model=tiny:llama", "cuts=[2]", "train.steps=1"])
    fleet = connect(cfg, resolve_model(cfg.model), [4])
    client = fleet.clients[0]
    hidden = torch.zeros(1, 4, 64)
    tensors = {"hidden": hidden, "attention_mask": torch.ones(1, 4, dtype=torch.long), "labels": torch.ones(1, 4, dtype=torch.long),
               "router": torch.zeros(1, 17)}
    with pytest.raises(RemoteError, match="carries tensor 'router', but this model adds no router loss"):
        client.link.send(Message("activations", client.session, 1, 0, tensors, {"num_items": 3})).result()
    fleet.close()
    cfg = load_config(None, [f"model={with_router_loss}", "cuts=[2]", "train.steps=1"])
    fleet = connect(cfg, resolve_model(cfg.model), [4])
    client = fleet.clients[0]
    tensors["router"] = torch.zeros(1, 5)
    with pytest.raises(RemoteError, match=r"tensor 'router' must be float32 of shape \[1, 9\]"):
        client.link.send(Message("activations", client.session, 1, 0, tensors, {"num_items": 3})).result()
    fleet.close()


def test_a_router_loss_of_another_form_is_refused(with_router_loss, monkeypatch):
    import transformers.models.mixtral.modeling_mixtral as mixtral

    monkeypatch.setattr(mixtral, "load_balancing_loss_func", lambda logits, experts, k, mask: torch.tensor(1.0))
    hf = AutoModelForCausalLM.from_pretrained(with_router_loss)
    with pytest.raises(RoutingError, match="MixtralForCausalLM's router loss is not Switch load balancing"):
        RouterAux.of(hf, hf.model.layers)
    monkeypatch.undo()
    assert RouterAux.of(hf, hf.model.layers).experts == hf.config.num_local_experts


def test_an_exported_expert_adapter_reproduces_the_split_model(tmp_path, monkeypatch):
    import splittune.run.loop as runner  # where train looks them up
    from test_export import split_logits

    kept, real = {}, runner.connect
    monkeypatch.setattr(runner, "connect", lambda *a, **k: kept.setdefault("fleet", real(*a, **k)))
    train(load_config(None, ["model=tiny:qwen3_moe", "cuts=[1,3]", "lora.experts=true", *SHORT]), tmp_path / "run")
    export_run(tmp_path / "run", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"][:2] == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    base = AutoModelForCausalLM.from_pretrained(str(resolve_model("tiny:qwen3_moe").path), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    batch = {"input_ids": torch.randint(3, 250, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    batch["attention_mask"][1, :3] = 0
    real_rows = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**batch).logits
        for name, p in model.named_parameters():  # the twin: without the experts' LoRA the logits differ
            if ".experts." in name and "lora_B" in name:
                p.zero_()
        without_experts = model(**batch).logits
    got = split_logits(kept["fleet"].clients[0], batch)
    assert torch.allclose(got[real_rows], expected[real_rows], atol=1e-5)
    assert not torch.allclose(got[real_rows], without_experts[real_rows], atol=1e-4)


@pytest.mark.parametrize("sets, error, fragment", [
    (["model=tiny:qwen3_moe", "clients=2", "schedule=sfl-v1", "lora.experts=true"], ConfigError, "peft cannot mix"),
    (["model=tiny:qwen3_moe", "clients=2", "lora.experts=true", "client_overrides=[{lora: {rank: 2}}]"], ConfigError,
     "every client lora.rank"),
])
def test_expert_lora_refuses_what_it_cannot_do(sets, error, fragment):
    with pytest.raises(error, match=fragment):
        load_config(None, ["cuts=[1,3]", *sets])


def test_expert_lora_on_a_dense_model_names_the_problem():
    with pytest.raises(AdapterError, match="hold no stacked expert weights"):
        verify(load_config(None, ["model=tiny:llama", "cuts=[1,3]", "lora.experts=true"]))


def test_dp_sgd_refuses_a_router_loss_that_ties_the_examples(with_router_loss, tmp_path):
    from splittune.defenses.dp_sgd import DPError

    with pytest.raises(DPError, match="router loss ties the examples"):
        train(load_config(None, [f"model={with_router_loss}", "cuts=[1,3]", *SHORT, "dp_sgd={noise_multiplier: 1.0}"]), tmp_path / "dp")
