"""Training runs end to end: run directory, determinism, split = centralized over several steps, byte accounting."""

import json

import pytest
import torch
from safetensors.torch import load_file

from splittune.config import load_config
from splittune.run import build, train
from splittune.wire import encode_frame
from configs import tiny

TINY = tiny("train.steps=4", "data.max_documents=4", "train.lr=0.01", "train.eval_batches=2")


def run(tmp_path, name, *overrides):
    out = tmp_path / name
    return train(load_config(None, [*TINY, *overrides]), out), out


def test_run_directory_has_everything(tmp_path):
    summary, out = run(tmp_path, "u", "cuts=[1,3]")
    for f in ["config.yaml", "metrics.jsonl", "summary.json", "loss.png", "adapters/client.safetensors",
              "adapters/server.safetensors", "adapters/manifest.json", "evals.jsonl"]:
        assert (out / f).exists(), f
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) >= {"step", "loss", "lr", "bytes_up", "bytes_down", "step_s"}
    keys = {"mode", "model", "cuts", "steps", "train_loss_first", "train_loss_last", "eval_loss_before", "eval_loss_after",
            "eval_ppl_before", "eval_ppl_after", "bytes_up", "bytes_down", "wall_s", "client_params", "server_params"}
    saved = json.loads((out / "summary.json").read_text())
    assert keys <= set(saved) and saved == json.loads(json.dumps(summary))
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows) > 0
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["server_params"] > 0 and summary["client_params"] > 0
    resolved = load_config(out / "config.yaml")
    assert resolved.cuts == [1, 3] and resolved.train.steps == 4
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_losses_bit_for_bit(tmp_path):
    a, out_a = run(tmp_path, "a", "cuts=[1,3]")
    b, out_b = run(tmp_path, "b", "cuts=[1,3]")
    losses = lambda out: [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses(out_a) == losses(out_b)
    for part in ("client", "server"):
        sa, sb = load_file(out_a / f"adapters/{part}.safetensors"), load_file(out_b / f"adapters/{part}.safetensors")
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c, out_c = run(tmp_path, "c", "cuts=[1,3]", "seed=1")
    assert losses(out_c) != losses(out_a)


@pytest.mark.parametrize("cuts", [[1, 3], [2]], ids=["u-shape", "two-part"])
def test_split_training_equals_centralized(tmp_path, cuts):
    """Several optimizer steps with gradient accumulation and clipping: same losses, same adapters."""
    extra = ["train.grad_accum=2", "train.max_grad_norm=0.05", "train.warmup_steps=1"]
    split, out_s = run(tmp_path, "split", f"cuts={cuts}", *extra)
    central, out_c = run(tmp_path, "central", f"cuts={cuts}", "mode=centralized", *extra)
    ls = [json.loads(x)["loss"] for x in (out_s / "metrics.jsonl").read_text().splitlines()]
    lc = [json.loads(x)["loss"] for x in (out_c / "metrics.jsonl").read_text().splitlines()]
    assert ls == pytest.approx(lc, abs=1e-5)
    both = {**load_file(out_s / "adapters/client.safetensors"), **load_file(out_s / "adapters/server.safetensors")}
    ref = load_file(out_c / "adapters/client.safetensors")
    assert set(both) == set(ref)
    assert max((both[k] - ref[k]).abs().max().item() for k in ref) < 1e-5
    assert any(v.abs().sum() > 0 for k, v in ref.items() if "lora_B" in k)  # the adapters did move
    assert central["bytes_up"] == 0 and split["bytes_up"] > 0
    assert split["eval_loss_after"] == pytest.approx(central["eval_loss_after"], abs=1e-5)


def test_bytes_are_the_encoded_frame_sizes(tmp_path):
    """Every byte counted is a byte of an encoded frame, and activation frames are their tensors plus a small header."""
    cfg = load_config(None, [*TINY, "cuts=[1,3]"])
    client, server, channel, source = build(cfg)
    seen = []
    channel.add_tap(lambda direction, msg, n: seen.append((direction, msg, n)))
    batch = {"input_ids": torch.randint(3, 200, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    up0, down0 = channel.bytes_up, channel.bytes_down  # the hello was sent before the tap existed
    client.train_step(1, [batch])
    assert [(d, m.kind) for d, m, _ in seen] == [("up", "activations"), ("down", "activations"), ("up", "gradients"),
                                                  ("down", "gradients"), ("up", "step"), ("down", "step")]
    for direction, msg, n in seen:  # replies also carry the server's time on the request (meta "link")
        bare = len(encode_frame(msg))
        assert n == bare if direction == "up" else bare < n < bare + 48
    assert channel.bytes_up - up0 == sum(n for d, _, n in seen if d == "up")
    assert channel.bytes_down - down0 == sum(n for d, _, n in seen if d == "down")
    hidden = 2 * 16 * 64 * 4  # batch × seq × width × fp32
    up_act = seen[0]
    assert set(up_act[1].tensors) == {"hidden", "attention_mask"}  # no token ids, no labels in a U-shape
    payload = hidden + 2 * 16 * 8
    assert payload < up_act[2] < payload + 400
    assert hidden < seen[2][2] < hidden + 400


def test_two_part_sends_labels_u_shape_does_not(tmp_path):
    for cuts, expect in (([2], {"hidden", "attention_mask", "labels"}), ([1, 3], {"hidden", "attention_mask"})):
        client, server, channel, _ = build(load_config(None, [*TINY, f"cuts={cuts}"]))
        kinds = []
        channel.add_tap(lambda d, m, n: kinds.append((d, m.kind, set(m.tensors))))
        batch = {"input_ids": torch.randint(3, 200, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
        batch["labels"] = batch["input_ids"].clone()
        client.train_step(1, [batch])
        assert kinds[0] == ("up", "activations", expect)
        assert all("input_ids" not in t for _, _, t in kinds)


def test_instruction_task_with_accuracy(tmp_path):
    summary, out = run(tmp_path, "sent", "cuts=[1,3]", "data.source=builtin:sentiment", "data.max_documents=200",
                       "data.max_eval_examples=16", "train.seq_len=320")
    assert summary["task"] == "instruction"
    assert 0.0 <= summary["eval_accuracy_after"] <= 1.0
    two_part, _ = run(tmp_path, "sent2", "cuts=[2]", "data.source=builtin:sentiment", "data.max_documents=200",
                      "data.max_eval_examples=16", "train.seq_len=320")
    centralized, _ = run(tmp_path, "sent3", "cuts=[2]", "mode=centralized", "data.source=builtin:sentiment",
                         "data.max_documents=200", "data.max_eval_examples=16", "train.seq_len=320")
    assert two_part["eval_accuracy_after"] == centralized["eval_accuracy_after"]
    assert two_part["eval_loss_after"] == pytest.approx(centralized["eval_loss_after"], abs=1e-5)


@pytest.mark.parametrize("shape", [["cuts=[1,3]"], ["cuts=[2]"]], ids=["u-shape", "two-part"])
def test_eval_batch_scores_and_loss_equal_the_unsplit_model(shape):
    """Evaluation takes three paths (local, logits on the client, loss and scores from the server): one answer."""
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    score = ([11, 8, 5], [17, 42, 99])
    split, _, _, _ = build(load_config(None, [*TINY, *shape]))
    whole, _, _, _ = build(load_config(None, [*TINY, *shape, "mode=centralized"]))
    got, want = split.eval_batch(batch, score), whole.eval_batch(batch, score)
    assert got[1] == want[1] == 3 * 11 - 3
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert got[2].shape == (3, 3) and torch.allclose(got[2], want[2], atol=1e-5)
    unlabelled = {**batch, "labels": torch.full_like(ids, -100)}
    assert split.eval_batch(unlabelled, score)[:2] == (0.0, 0)
    assert torch.allclose(split.eval_batch(unlabelled, score)[2], want[2], atol=1e-5)


def test_the_median_steps_parts_add_up_to_that_step():
    from splittune.run.summary import step_breakdown

    rows = [{"step_s": s, "compute_s": c, "codec_s": 0.1, "wait_s": s - c - 0.1, "server_s": 0.2, "wire_s": 0.05}
            for s, c in [(1.0, 0.2), (3.0, 2.5), (2.0, 0.3), (9.0, 0.4), (1.5, 1.0)]]
    t = step_breakdown(rows)["time_median_s"]
    assert t["step_s"] == 2.0 and abs(t["compute_s"] + t["codec_s"] + t["wait_s"] - t["step_s"]) < 1e-9
    separate = sorted(r["compute_s"] for r in rows)[2] + 0.1 + sorted(r["wait_s"] for r in rows)[2]
    assert abs(separate - 2.0) > 0.1  # the twin: medians taken part by part do not add up to any step
