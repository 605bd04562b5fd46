"""bfloat16 weights: the adapters and their optimizer state stay float32, the losses stay near float32's, and a bf16
activation crosses the cut as its two bytes, so the bf16 codec costs nothing more on a bf16 run."""

from __future__ import annotations

import json

import torch

from configs import tiny
from splittune.config import load_config
from splittune.run import build, train

RUN = tiny("cuts=[1,3]", "train.steps=3", "data.max_documents=6", "train.warmup_steps=0", "train.lr=0.01")


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_weights_train_float32_adapters_close_to_a_float32_run(tmp_path):
    client, server, link, _ = build(load_config(None, [*RUN, "train.dtype=bfloat16"]))
    try:
        assert next(client.party.blocks[0].parameters()).dtype == torch.bfloat16  # the frozen weights as asked
        assert {p.dtype for _, p in client.party.trained()} == {p.dtype for _, p in server.party.trained()} == {torch.float32}
    finally:
        link.close()
        server.close()
    train(load_config(None, RUN), tmp_path / "fp32")
    train(load_config(None, [*RUN, "train.dtype=bfloat16"]), tmp_path / "bf16")
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert all(abs(x - y) / x < 0.02 for x, y in zip(a, b, strict=True)) and a != b  # close, and not the same run


def test_a_bf16_activation_crosses_as_two_bytes_and_the_bf16_codec_changes_nothing(tmp_path):
    raw = train(load_config(None, [*RUN, "train.dtype=bfloat16"]), tmp_path / "raw")
    coded = train(load_config(None, [*RUN, "train.dtype=bfloat16", "codec.up=bf16", "codec.down=bf16"]), tmp_path / "bf16")
    assert losses(tmp_path / "raw") == losses(tmp_path / "bf16")
    assert abs(raw["bytes_up"] - coded["bytes_up"]) < 1e-3 * raw["bytes_up"]  # the same payload; frames name their codec
    fp32 = train(load_config(None, RUN), tmp_path / "fp32")
    assert fp32["bytes_up"] > 1.8 * raw["bytes_up"]  # the twin: float32 activations cross as four bytes each
