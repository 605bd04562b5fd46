"""Export: one PEFT adapter on the unsplit base model gives the split model's logits."""

import json
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from splittune.config import load_config
from splittune.export import ExportError, export_run
from splittune.models.zoo import resolve_model
from splittune.run import build, train

BASE = ["train.steps=3", "train.seq_len=32", "train.batch_size=2", "data.max_documents=4", "train.lr=0.02", "train.eval_batches=1"]


def split_logits(client, batch):
    """Logits of the trained split model, computed across the parties (U-shape)."""
    plan, party = client.plan, client.party
    with torch.no_grad():
        h = party.run(0, plan.segment("bottom").end, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).hidden
        reply = client._call("activations", 0, 0, {"hidden": h, "attention_mask": batch["attention_mask"]}, train=False)
        top = plan.segment("top")
        return party.run(top.start, top.end, hidden=reply.tensors["hidden"], attention_mask=batch["attention_mask"], want_logits=True).logits


@pytest.mark.parametrize("model", ["tiny:llama", "tiny:gpt2", "tiny:opt"])
def test_exported_adapter_reproduces_split_logits(tmp_path, model, monkeypatch):
    import splittune.run.loop as runner  # where train looks them up

    kept = {}
    real_connect = runner.connect
    monkeypatch.setattr(runner, "connect", lambda *args, **kw: kept.setdefault("fleet", real_connect(*args, **kw)))
    cfg = load_config(None, [f"model={model}", "cuts=[1,3]", *BASE])
    train(cfg, tmp_path / "run")
    client = kept["fleet"].clients[0]
    info = export_run(tmp_path / "run", tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists() and info["layers"] == [0, 1, 2, 3]

    base = AutoModelForCausalLM.from_pretrained(str(resolve_model(model).path), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    batch = {"input_ids": torch.randint(3, 250, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    batch["attention_mask"][1, :3] = 0
    with torch.no_grad():
        expected = peft_model(**batch).logits
    got = split_logits(client, batch)
    real = batch["attention_mask"].bool()  # padding never crosses the cut: pad positions' logits are nobody's
    assert torch.allclose(got[real], expected[real], atol=1e-5), (got[real] - expected[real]).abs().max()
    with peft_model.disable_adapter(), torch.no_grad():
        untouched = peft_model(**batch).logits
    assert not torch.allclose(untouched, expected, atol=1e-4)  # the adapter really changes the model


def test_two_part_export_and_merge(tmp_path):
    cfg = load_config(None, ["model=tiny:qwen2", "cuts=[2]", *BASE])
    with warnings.catch_warnings():  # peft's FutureWarning about transformers' renamed property stays out of output
        warnings.simplefilter("error", FutureWarning)
        train(cfg, tmp_path / "run")
        export_run(tmp_path / "run", tmp_path / "adapter", merge=True)
    source = resolve_model("tiny:qwen2")
    base = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter" / "merged"), dtype=torch.float32).eval()
    ids = torch.randint(3, 250, (1, 12))
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    # the centralized model with the run's adapters loaded gives the same logits
    client, _, _, _ = build(load_config(None, ["model=tiny:qwen2", "cuts=[2]", "mode=centralized", *BASE]))
    from safetensors.torch import load_file
    from splittune.models.adapters import load_trainable_state

    state = {**load_file(tmp_path / "run/adapters/client.safetensors"), **load_file(tmp_path / "run/adapters/server.safetensors")}
    load_trainable_state(client.party.model, state)
    client.party.model.eval()
    with torch.no_grad():
        out = client.party.run(0, client.plan.n_blocks, input_ids=ids, attention_mask=torch.ones_like(ids), want_logits=True)
        assert torch.allclose(out.logits, merged(input_ids=ids).logits, atol=1e-5)


def test_gpt2_two_part_with_lora_only_on_the_server(tmp_path):
    """The Conv1D layout flag comes from whichever party holds LoRA."""
    train(load_config(None, ["model=tiny:gpt2", "cuts=[2]", "segments.bottom=frozen", *BASE]), tmp_path / "run")
    export_run(tmp_path / "run", tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    base = AutoModelForCausalLM.from_pretrained(str(resolve_model("tiny:gpt2").path), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(tmp_path / "adapter"))  # loads without shape errors


def test_full_segments_need_merge(tmp_path):
    cfg = load_config(None, ["model=tiny:llama", "cuts=[1,3]", "segments.top=full", *BASE])
    train(cfg, tmp_path / "run")
    with pytest.raises(ExportError, match=r"segments \['top'\] trained all their weights.*--merge"):
        export_run(tmp_path / "run", tmp_path / "adapter")
    export_run(tmp_path / "run", tmp_path / "merged", merge=True)
    assert (tmp_path / "merged" / "merged" / "config.json").exists()
    with pytest.raises(ExportError, match="not a finished run directory"):
        export_run(tmp_path, tmp_path / "x")


def test_an_export_loads_elsewhere_with_its_tokenizer_and_is_not_overwritten_by_accident(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from splittune.export import base_reference

    train(load_config(None, ["model=tiny:llama", "cuts=[1,3]", *BASE]), tmp_path / "run")
    info = export_run(tmp_path / "run", tmp_path / "adapter")
    assert info["base_model"] == str(resolve_model("tiny:llama").path)  # a tiny model exists only where it was built
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))  # the base found from the adapter alone
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "adapter"))
    assert tokenizer.get_vocab() == resolve_model("tiny:llama").tokenizer().get_vocab()
    assert model(**tokenizer("To be", return_tensors="pt")).logits.shape[-1] == model.config.vocab_size
    with pytest.raises(ExportError, match=r"already holds files \(adapter_config.json.*--force to overwrite"):
        export_run(tmp_path / "run", tmp_path / "adapter")
    assert export_run(tmp_path / "run", tmp_path / "adapter", force=True)["lora_tensors"] == info["lora_tensors"]
    # the reference the user gave, a hub id for a builtin model (its GGUF release's weights, dequantized)
    assert base_reference("builtin:smollm2-135m", None) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_reference("./models/mine", None) == "./models/mine" and base_reference("org/model", None) == "org/model"
