"""bfloat16 weights: the adapters and their optimizer state stay float32, the losses stay near float32's, and a bf16
activation crosses the cut as its two bytes, so the bf16 codec costs nothing more on a bf16 run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from configs import tiny
from interrupt import killed_then_resumed
from splittune.config import ConfigError, load_config
from splittune.parties import precision
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


# -- autocast and float16 loss scaling ------------------------------------------------------------------------------
def matmul_dtypes(party, ids):
    """The dtypes the client's linear layers computed in for one training forward of its bottom, and the cut's dtype."""
    seen, hooks = set(), []
    for module in party.model.modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(lambda m, i, o: seen.add(o.dtype)))
    try:
        out = party.run(0, party.segments[0].end, input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hooks:
            h.remove()
    return seen, out.hidden.dtype


@pytest.mark.parametrize("autocast", [None, "bfloat16", "float16"])
def test_autocast_computes_in_its_dtype_over_float32_weights_and_the_cut_keeps_float32(autocast):
    client, server, link, _ = build(load_config(None, [*RUN, *([f"train.autocast={autocast}"] if autocast else [])]))
    try:
        seen, cut = matmul_dtypes(client.party, torch.randint(3, 200, (2, 8)))
        assert seen == {getattr(torch, autocast or "float32")}  # the twin (None): float32 products without autocast
        assert cut == torch.float32  # what crosses the cut is in the weights' dtype
        assert next(client.party.blocks[0].parameters()).dtype == torch.float32
        assert server.party.autocast == (getattr(torch, autocast) if autocast else None)  # the hello carried it
    finally:
        link.close()
        server.close()


@pytest.mark.parametrize("cuts", ["cuts=[1,3]", "cuts=[2]", "mode=centralized"])
def test_autocast_runs_stay_close_to_float32_with_float32_adapters(tmp_path, cuts):
    base = [*RUN, cuts]
    train(load_config(None, base), tmp_path / "fp32")
    ref = losses(tmp_path / "fp32")
    for dtype in ("bfloat16", "float16"):
        summary = train(load_config(None, [*base, f"train.autocast={dtype}"]), tmp_path / dtype)
        got = losses(tmp_path / dtype)
        assert all(abs(x - y) / x < 0.01 for x, y in zip(ref, got, strict=True)) and got != ref, (dtype, ref, got)
        rows = metric_rows(tmp_path / dtype)
        if dtype == "float16":  # the loss is scaled (GradScaler's start) and nothing overflowed
            assert [r["loss_scale"] for r in rows] == [2.0**16] * 3 and summary["steps_skipped"] == 0
        else:
            assert "loss_scale" not in rows[0] and "steps_skipped" not in summary
    for f in (tmp_path / "float16" / "adapters").glob("*.safetensors"):
        assert {t.dtype for t in load_file(f).values()} == {torch.float32}


def metric_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def state(party):
    return {k: v.clone() for k, v in party.state().items()}


def changed(before, party):
    return any(not torch.equal(v, party.state()[k]) for k, v in before.items())


@pytest.mark.parametrize("cuts", ["cuts=[1,3]", "cuts=[2]"])
@pytest.mark.parametrize("where", [None, "client", "server"])
def test_an_overflow_on_either_party_skips_the_step_on_both(cuts, where):
    """The step message carries the scale and the client's overflow, the reply the server's: one Inf anywhere and
    neither party steps, and the scale halves. The twin (None): both step and the scale stays."""
    client, server, link, _ = build(load_config(None, [*RUN, cuts, "train.autocast=float16"]))
    try:
        ids = torch.randint(3, 200, (2, 16))
        client.backward(1, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}])
        mine, theirs = state(client.party), state(server.party)
        if where is not None:
            party = client.party if where == "client" else server.party
            next(p for _, p in party.trained() if p.grad is not None).grad.view(-1)[0] = float("inf")
        lr = server.party.lr
        skipped = client.optimizer_step(1)
        assert skipped == (where is not None)
        assert changed(mine, client.party) == changed(theirs, server.party) == (where is None)
        assert (server.party.lr != lr) == (where is None)  # a skipped step does not move the LR schedule either
        assert client.party.loss_scale().scale == (2.0**15 if where else 2.0**16)
        assert all(p.grad is None for _, p in [*client.party.trained(), *server.party.trained()])
    finally:
        link.close()
        server.close()


def test_a_scale_too_big_for_float16_backs_off_until_steps_go_through(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "INIT_SCALE", 2.0**22)
    summary = train(load_config(None, [*RUN, "train.steps=8", "train.autocast=float16"]), tmp_path / "run")
    rows = metric_rows(tmp_path / "run")
    assert rows[0]["skipped"] and not rows[-1]["skipped"], rows  # float16 overflows at 2²², then steps go through
    for row, after in zip(rows, rows[1:]):  # GradScaler's rule: halve after an overflow, else keep (growth: 2000 steps)
        assert after["loss_scale"] == row["loss_scale"] / (2 if row["skipped"] else 1)
    assert summary["steps_skipped"] == sum(r["skipped"] for r in rows) and summary["loss_scale_last"] == rows[-1]["loss_scale"]


def test_float16_resume_is_exact_with_the_loss_scale_in_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "GROWTH_INTERVAL", 2)  # the scale doubles every two clean steps: the state matters
    cfg = load_config(None, [*RUN, "train.steps=6", "train.autocast=float16", "train.checkpoint_every=2"])
    train(cfg, tmp_path / "whole")
    killed_then_resumed(monkeypatch, 5, lambda: train(cfg, tmp_path / "cut"))
    a, b = metric_rows(tmp_path / "whole"), metric_rows(tmp_path / "cut")
    assert [(r["loss"], r["loss_scale"]) for r in a] == [(r["loss"], r["loss_scale"]) for r in b]
    scale = precision.LossScale.of("dynamic")
    for row in a:  # the rule, step by step; the scale grew, so the resume had to restore it and its clean-step count
        assert row["loss_scale"] == scale.scale
        scale.update(row["skipped"])
    assert max(r["loss_scale"] for r in a) > 2.0**16


@pytest.mark.parametrize("sets, message", [
    (["train.dtype=bfloat16", "train.autocast=float16"], "train.autocast computes in float16 over float32 weights, but train.dtype is bfloat16"),
    (["train.loss_scale=0"], "must be dynamic or a number > 0, got 0"),
    (["train.autocast=float16", "cuts=[1,3]", "dp_sgd={noise_multiplier: 0.5}"], "dp_sgd clips each example's gradient, and a float16 run"),
])
def test_mixed_precision_settings_that_cannot_work_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, tiny(*sets))


@pytest.mark.parametrize("autocast", ["float16", None])
def test_only_a_float16_run_sends_zeros_for_an_overflowed_gradient(autocast):
    """In float16 an Inf gradient is an overflow: zeros cross and the step is skipped. Otherwise it is a fault: it
    crosses as it is, and the receiver refuses it (a NaN or Inf tensor) instead of training on zeros."""
    client, server, link, _ = build(load_config(None, [*RUN, *([f"train.autocast={autocast}"] if autocast else [])]))
    try:
        bad = torch.tensor([1.0, float("inf")])
        sent = client._finite(bad)
        engine = server.engine
        back = engine.run(engine._finite, "default", bad)
        if autocast:
            assert torch.equal(sent, torch.zeros(2)) and client._overflow and torch.equal(back, torch.zeros(2))
            assert engine.overflowed == {"default"}
        else:
            assert sent is bad and back is bad and not client._overflow and not engine.overflowed
    finally:
        link.close()
        server.close()
