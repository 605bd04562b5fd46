"""``bench --suite memory``: real-shaped random checkpoints written block by block, and the rows, table and plot of
measured and estimated peaks (the 1B/8B runs themselves are benchmarks, not tests)."""

from __future__ import annotations

import json

import pytest

from splittune.bench import footprint, shapes
from splittune.config import load_config
from splittune.models.zoo import resolve_model

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=256, rope_theta=10000.0)


@pytest.fixture
def small_shape(monkeypatch):
    monkeypatch.setitem(shapes.SHAPES, "small", SMALL)
    return "small"


def test_a_shaped_checkpoint_has_the_real_sizes_one_shard_per_block_and_loads(small_shape, tmp_path):
    out = shapes.build_checkpoint(small_shape, tmp_path / "ckpt")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == SMALL["num_hidden_layers"] + 1  # one shard per block, and one for the rest
    assert index["weight_map"]["model.layers.3.mlp.down_proj.weight"] == "model-block-003.safetensors"
    source = resolve_model(str(out))
    config = source.config()
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 6, 512)
    from splittune.run import build

    client, server, link, _ = build(load_config(None, [f"model={out}", "cuts=[2,4]", "quantize.trunk=nf4"]))
    try:
        block = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64  # q and o, k and v, the MLP, two norms
        assert server.party.weights.params == 2 * block  # the trunk's two blocks, as the config's sizes make them
    finally:
        link.close()
        server.close()
    mtime = (out / "model.safetensors.index.json").stat().st_mtime
    assert shapes.build_checkpoint(small_shape, out) == out and (out / "model.safetensors.index.json").stat().st_mtime == mtime


def test_rows_pair_measured_and_estimated_peaks_and_a_party_that_cannot_fit_is_not_started(small_shape, tmp_path, monkeypatch):
    measured = []

    def fake_memory(cfg, steps, threads, workdir):  # what a run records, without the processes
        measured.append((cfg.train.dtype, cfg.quantize.trunk))
        return {"client_peak_rss": 1 << 30, "server_peak_rss": 2 << 30}

    monkeypatch.setattr(footprint, "party_memory", fake_memory)
    monkeypatch.setattr(footprint, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(footprint, "estimate", lambda cfg: {"client": 1 << 30, "server": (3 << 40) if cfg.quantize.trunk == "none"
                                                            and cfg.train.dtype == "float32" else 1 << 30})
    rows = footprint.run_footprint(tmp_path / "runs", 1, shapes=(small_shape,))
    assert [r["precision"] for r in rows] == ["fp32", "bf16", "int8", "nf4", "nf4 + head"]
    assert "does not fit" not in footprint.table(rows[1:]) and rows[1]["server_peak_rss"] == 2 << 30
    assert "exceed this machine's" in rows[0]["server_skipped"] and "server_peak_rss" not in rows[0]
    assert measured[0] == ("float32", "nf4")  # the fp32 client measured against a server that fits
    table = footprint.table(rows)
    assert "| small | fp32 | 1.00 | 1.00 | does not fit | 3072.00 |" in table
    assert footprint.plot(rows, tmp_path).stat().st_size > 10_000


def test_the_gpu_suite_says_it_needs_a_gpu_where_there_is_none(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from splittune.cli import app

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = CliRunner().invoke(app, ["bench", "--suite", "gpu", "--out", str(tmp_path / "gpu")])
    assert result.exit_code == 2 and "error: bench --suite gpu needs a CUDA GPU, and torch sees none here" in result.output
    assert "Traceback" not in result.output


def test_the_gpu_suite_puts_the_server_on_the_gpu_and_the_client_on_each_device(small_shape, tmp_path, monkeypatch):
    """What would run on a lent GPU, without one: the configs and serve flags each row asks for."""
    asked = []

    def fake_memory(cfg, steps, threads, workdir, server_args=()):
        asked.append((cfg.train.device, cfg.train.dtype, cfg.quantize.trunk, server_args))
        return {"client_peak_rss": 1 << 30, "server_peak_rss": 1 << 30, "client_peak_device": 1 << 29, "step_s": 0.5}

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(footprint, "party_memory", fake_memory)
    monkeypatch.setattr(footprint, "cache_dir", lambda: tmp_path)
    rows = footprint.run_gpu(tmp_path / "runs", 1, shapes=(small_shape,))
    assert asked == [("cpu", "bfloat16", "none", ("--device", "cuda")), ("cuda", "bfloat16", "none", ("--device", "cuda")),
                     ("cpu", "bfloat16", "nf4", ("--device", "cuda")), ("cuda", "bfloat16", "nf4", ("--device", "cuda"))]
    assert "| small | nf4 | cuda | 0.500 | 0.50 | 1.00 | - | 1.00 |" in footprint.gpu_table(rows)
