"""MID: the bottleneck is what the server's tap holds (and nothing at β = 0), its KL and pullback are the math it
says, it trains and resumes exactly, and an attacker who knows it replays it. Also, once for the three learned
defenses (mid, adversarial, textobfuscator) together: gRPC equals in-process, and a resumed run is exact."""

from __future__ import annotations

import json
import math

import pytest
import torch

from splittune.config import ConfigError, load_config
from splittune.cut.transforms import Crossing, End
from splittune.defenses.mid import Bottleneck, Mid
from splittune.privacy.attacks.base import run_attack
from splittune.privacy.attacks.inversion import Inversion
from splittune.privacy.knowledge import PublicKnowledge
from splittune.run import train
from splittune.taps.tap import Tap
from splittune.wire import Message

from configs import SMALLEST, small
from interrupt import killed_then_resumed

BASE = small(f"model={SMALLEST}", "train.steps=2", "train.seq_len=16", "data.max_documents=2", "data.max_train_examples=8")
MID = "defense=[{name: mid, beta: 0.5, init: 0.3}]"


def _run(tmp_path, name, *sets, tap=True):
    out = tmp_path / name
    return out, train(load_config(None, [*BASE, *sets]), out, record_tap=("server",) if tap else ())


def activations(out, step=1) -> list[torch.Tensor]:
    tap = Tap.open(out / "tap" / "server")
    return [r.tensor("hidden") for r in tap.records("activations", "up") if r.meta.get("train") and r.step == step]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("shape", [["cuts=[1,2]"], ["cuts=[1]", "codec.up=int8", "train.micro_batches=2"]])
def test_the_bottleneck_is_what_the_server_sees_and_nothing_at_beta_zero(tmp_path, shape):
    clean_out, clean = _run(tmp_path, "clean", *shape)
    out, summary = _run(tmp_path, "mid", *shape, MID, "defense_seed=1")
    for a, b in zip(activations(clean_out), activations(out), strict=True):
        assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-3)
        rms = a.float().pow(2).mean(-1, keepdim=True).sqrt()  # the pretrained bottom at step 1: the noise is 0.3·rms
        assert 0.2 < float(((b.float() - a.float()) / rms).std()) < 0.4
    assert summary["privacy"]["mid"] == {"beta": 0.5, "width": None, "init": 0.3}
    off_out, off = _run(tmp_path, "off", *shape, "defense=[{name: mid, beta: 0.0}]")  # the twin: off changes no bit
    assert all(torch.equal(a, b) for a, b in zip(activations(clean_out, 2), activations(off_out, 2), strict=True))
    assert off["train_loss_last"] == clean["train_loss_last"] and off["eval_loss_after"] == clean["eval_loss_after"]


def test_the_kl_and_the_pullback_are_the_bottleneck_s_math():
    torch.manual_seed(0)
    b = Bottleneck(8, 8, init=0.5)
    h, eps = torch.randn(2, 3, 8) * 4, torch.randn(2, 3, 8)
    rms = h.pow(2).mean(-1, keepdim=True).sqrt()
    out, kl = b(h, eps)
    assert torch.allclose(out, h + 0.5 * rms * eps, atol=1e-5)  # identity at init, noise init × rms
    x = h / rms  # by hand: 0.5·mean(μ² + σ² − 1 − log σ²) with μ = x, σ = 0.5
    assert torch.allclose(kl, 0.5 * (x.pow(2) + 0.25 - 1 - math.log(0.25)).mean(-1), atol=1e-5)
    narrow, _ = Bottleneck(8, 3, init=1e-6)(h, torch.zeros(2, 3, 3))
    assert not torch.allclose(narrow, h, atol=1e-2)  # the twin: a narrower bottleneck loses what it cannot hold

    mid = Mid(beta=2.0, init=0.5)
    mid.bind(7, "up.0.mid")
    end, x = End(), torch.randn(2, 3, 8)
    crossing = Crossing(Message("activations", "s", 1, 0, {"hidden": x, "attention_mask": torch.ones(2, 3)}, {}))
    mid.send(crossing, end)
    sent, g = crossing.msg.tensors["hidden"], torch.randn(2, 3, 8)
    got = end.pullbacks.pop((1, 0))(g)
    leaf = x.clone().requires_grad_(True)  # the same sample by autograd: out·g + β·mean KL
    replay = Mid(beta=2.0, init=0.5)
    replay.bind(7, "up.0.mid")
    replay._build(8)
    noise = torch.randn((2, 3, 8), generator=replay.generator(1, 0))
    out, kl = replay.trained.module(leaf, noise)
    assert torch.equal(out.detach(), sent)
    (expected,) = torch.autograd.grad((out * g).sum() + 2.0 * kl.mean(), leaf)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, g, atol=1e-3)  # the twin: passing the gradient through unchanged would be wrong
    assert mid.trained.has_grad()  # the bottleneck's own gradient, applied before the next crossing
    before = mid.trained.module.mu.weight.clone()
    mid.send(Crossing(Message("activations", "s", 2, 0, {"hidden": x}, {})), end)
    assert not torch.equal(before, mid.trained.module.mu.weight)


def test_mid_refuses_a_bottom_that_cannot_train():
    with pytest.raises(ConfigError, match="defense mid trains its bottleneck .* segments.bottom: frozen"):
        load_config(None, [*BASE, "segments.bottom=frozen", MID])
    load_config(None, [*BASE, "segments.bottom=frozen", "defense=[{name: mid, beta: 0}]"])  # the twin: off needs nothing
    with pytest.raises(ConfigError, match="defense.0.mid.init"):
        load_config(None, [*BASE, "defense=[{name: mid, beta: 1, init: 0}]"])


def test_an_attacker_replays_the_announced_bottleneck(tmp_path):
    out, _ = _run(tmp_path, "mid", "train.batch_size=2", MID, "defense_seed=1")
    public = PublicKnowledge(SMALLEST, aux="builtin:sentiment")
    fast = {"aux_rows": 8, "random_rows": 4, "epochs": 1, "model": "linear"}
    for adaptive in (True, False):
        recovery = run_attack(Inversion({**fast, "adaptive": adaptive}), Tap.open(out / "tap" / "server"), public)
        assert recovery.items and recovery.info["defenses"] == (
            [{"name": "mid", "beta": 0.5, "width": None, "init": 0.3, "lr": 1e-3}] if adaptive else [])


LEARNED = ("defense=[{name: mid, beta: 0.5}, {name: adversarial, weight: 0.5}, "
           "{name: textobfuscator, clusters: 8, pull: 0.5, noise: 0.5}]")


def test_the_learned_defenses_resume_exactly(tmp_path, monkeypatch):
    """mid's bottleneck and adversarial's inverter (weights and Adam moments) and the noise counts are in the
    client's checkpoint: a run killed after step 2 and resumed equals the run that never stopped."""
    extra = ["train.steps=4", "train.checkpoint_every=2", "segments.bottom=full", LEARNED, "defense_seed=2"]
    _, whole = _run(tmp_path, "whole", *extra, tap=False)
    _, cut = killed_then_resumed(monkeypatch, 3, lambda: _run(tmp_path, "cut", *extra, tap=False))
    assert [r["loss"] for r in rows(tmp_path / "whole")] == [r["loss"] for r in rows(tmp_path / "cut")]
    assert [r["adversarial_inverter_loss"] for r in rows(tmp_path / "whole")] == \
           [r["adversarial_inverter_loss"] for r in rows(tmp_path / "cut")]
    assert whole["eval_loss_after"] == cut["eval_loss_after"]


def test_the_learned_defenses_over_grpc_are_the_in_process_run(tmp_path):
    """Contract 4: the defenses run on the client, so a served run crosses the same tensors."""
    from served import serve_here
    from splittune.channels.grpc import GrpcChannel
    from splittune.deploy.service import SplitService
    from splittune.models.arch import detect_arch
    from splittune.models.zoo import resolve_model
    from splittune.parties import Server
    from splittune.run import train_remote
    from splittune.schedules.policy import POLICIES

    extra = [LEARNED, "defense_seed=2", "cuts=[1]"]
    _run(tmp_path, "local", *extra)
    source = resolve_model(SMALLEST)
    server, port = serve_here(SplitService(Server(source, detect_arch(source.config()), wait_s=30, policies=POLICIES), None))
    try:
        train_remote(load_config(None, [*BASE, *extra]), tmp_path / "remote", 0, lambda i: GrpcChannel(f"grpc://127.0.0.1:{port}"))
    finally:
        server.stop(None)
    assert [r["loss"] for r in rows(tmp_path / "local")] == [r["loss"] for r in rows(tmp_path / "remote")]
    assert [r["adversarial_inverter_loss"] for r in rows(tmp_path / "local")] == \
           [r["adversarial_inverter_loss"] for r in rows(tmp_path / "remote")]
