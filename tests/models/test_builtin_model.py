"""Integration on the real builtin model (SmolLM2-135M), truncated to 4 blocks to stay fast."""

import json

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from splittune.config import load_config
from splittune.models.zoo import resolve_model
from splittune.run import train
from splittune.verify import verify

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol4(tmp_path_factory):
    """The real SmolLM2 weights and tokenizer, keeping only blocks 0..3."""
    source = resolve_model("builtin:smollm2-135m")
    out = tmp_path_factory.mktemp("smol4")
    config = json.loads((source.path / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["model_type"] == "llama"
    config["num_hidden_layers"] = 4
    (out / "config.json").write_text(json.dumps(config))
    keep = {}
    with safe_open(str(source.path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if not key.startswith("model.layers.") or int(key.split(".")[2]) < 4:
                keep[key] = f.get_tensor(key)
    save_file(keep, str(out / "model.safetensors"))
    for name in source.path.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            (out / name.name).write_bytes(name.read_bytes())
    return out


def test_builtin_model_is_the_real_smollm2():
    source = resolve_model("builtin:smollm2-135m")
    tok = source.tokenizer()
    assert tok.chat_template and len(tok) == 49152
    assert len(source.weight_map()) == 272


def test_real_weights_split_exactly(smol4):
    report = verify(load_config(None, [f"model={smol4}", "cuts=[1,3]"]), batch=2, seq=16, padding=True)
    assert report.ok, report


def test_real_weights_learn_shakespeare(smol4, tmp_path):
    cfg = load_config(None, [f"model={smol4}", "cuts=[1,3]", "train.steps=6", "train.seq_len=64", "train.batch_size=2",
                             "train.lr=0.002", "data.max_documents=2", "train.eval_batches=2"])
    summary = train(cfg, tmp_path / "run")
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["bytes_up"] == sum(json.loads(x)["bytes_up"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines())
    hidden = 2 * 64 * 576 * 4
    assert summary["bytes_up"] > 6 * 2 * hidden  # activations and gradients, fp32, every step
