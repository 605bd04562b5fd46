"""The command line: what a user types, and what they see when they get something wrong."""

import json

from typer.testing import CliRunner

from splittune.cli import app

runner = CliRunner()
TINY = ["--set", "model=tiny:gpt2", "--set", "train.steps=2", "--set", "train.seq_len=32", "--set", "data.max_documents=3",
        "--set", "train.eval_batches=1"]


def test_train_then_export(tmp_path):
    result = runner.invoke(app, ["train", *TINY, "--set", "cuts=[1,3]", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "eval loss" in result.output and "bytes sent" in result.output and str(tmp_path / "run") in result.output.replace("\n", "")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["cuts"] == [1, 3] and summary["steps"] == 2
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_train_with_config_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny:llama\ncuts: [2]\ntrain:\n  steps: 1\n  seq_len: 16\n  eval_batches: 1\ndata:\n  max_documents: 3\n")
    result = runner.invoke(app, ["train", "--config", str(cfg), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["mode"] == "split"


def test_train_errors_are_clear(tmp_path):
    result = runner.invoke(app, ["train", "--set", "train.stepz=3"])
    assert result.exit_code == 2 and "unknown config key 'train.stepz'" in result.output
    result = runner.invoke(app, ["train", *TINY, "--set", "cuts=[1,9]", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "do not fit a model of 4 blocks" in result.output
    result = runner.invoke(app, ["train", *TINY, "--set", f"data.source={tmp_path / 'missing.jsonl'}", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "missing.jsonl" in result.output


def test_verify_command():
    result = runner.invoke(app, ["verify", "--model", "tiny:mistral", "--cuts", "1,3", "--padding"])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "gradients" in result.output
    result = runner.invoke(app, ["verify", "--model", "tiny:mistral", "--cuts", "7"])
    assert result.exit_code == 2 and "it has 4 blocks" in result.output


def test_verify_fails_with_exit_1(monkeypatch):
    import splittune.verify as verify_mod

    real = verify_mod.verify

    def broken(*a, **k):
        report = real(*a, **k)
        report.max_grad_diff = 1.0
        return report

    monkeypatch.setattr(verify_mod, "verify", broken)
    result = runner.invoke(app, ["verify", "--model", "tiny:llama", "--cuts", "2"])
    assert result.exit_code == 1 and "FAIL" in result.output


def test_models_and_fetch():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "builtin:smollm2-135m" in result.output and "gpt_neox" in result.output
    result = runner.invoke(app, ["fetch", "builtin:shakespeare", "--print-path"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(".jsonl")
    result = runner.invoke(app, ["fetch", "builtin:nothing"])
    assert result.exit_code == 2 and "unknown builtin" in result.output


def test_cli_trains_many_clients_and_exports_one(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *TINY, "--set", "data.max_documents=8", "--set", "cuts=[1,3]", "--set", "clients=2", "--set", "schedule=sfl-v1",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 clients · sfl-v1" in result.output
    result = runner.invoke(app, ["export", str(out), "--client", "1", "--out", str(tmp_path / "c1")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c1" / "adapter_config.json").exists()
    result = runner.invoke(app, ["export", str(out), "--client", "7", "--out", str(tmp_path / "c7")])
    assert result.exit_code == 2 and "has clients 0..1; there is no client 7" in " ".join(result.output.split())


def test_cli_compare(tmp_path):
    result = runner.invoke(app, ["compare", *TINY, "--set", "data.max_documents=8", "--set", "cuts=[1,3]", "--set", "train.steps=2", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "using clients=3" in result.output
    for name in ("centralized", "federated", "sequential", "sfl-v1", "sfl-v2"):
        assert name in result.output
    assert (tmp_path / "c" / "compare.json").exists()
