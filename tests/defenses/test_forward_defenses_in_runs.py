"""``privtune``, ``dp-forward``, ``santext`` and ``custext`` in whole runs: at their off setting (``epsilon: inf``) they
change no bit of what the server sees; on, dp-forward's noise is what the server sees (the others' twins:
``test_privtune.py``, ``test_substitution.py``); all four together run on a
U-shaped split through int8 and pipelined micro-batches, in-process and over gRPC alike, and the adaptive inversion
attack runs on the tap they leave (on the smallest model: that it runs, not how well)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from splittune.config import load_config
from splittune.dpmath.mechanisms import analytic_gaussian_sigma, clip_rows
from splittune.run import train
from splittune.taps.tap import Tap, Truth
from configs import SMALLEST
from short_text import short_run

AT_0 = ("cuts=[0]",)  # what crosses is the embedding output: the undefended view is the table's rows, known exactly
ALL_FOUR = ("{name: santext, epsilon: %s}", "{name: privtune, epsilon: %s}", "{name: dp-forward, epsilon: %s, clip: 2}",
            "{name: custext, epsilon: %s, top: 8}")


def _seen_and_undefended(out) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training activations the server received, and the embedding rows of the tokens the client sent."""
    from splittune.privacy.knowledge import PublicKnowledge

    tap, truth = Tap.open(out / "tap" / "server"), Truth.open(out / "tap" / "truth")
    rec = next(r for r in tap.records("activations", "up") if r.meta.get("train") and r.step == 1)
    ids = truth.batch(rec.session, rec.step, rec.micro)["input_ids"]
    return rec.tensor("hidden"), PublicKnowledge(SMALLEST).embeddings()[ids]


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_at_epsilon_inf_the_four_change_nothing(tmp_path):
    entries = ", ".join(e % "inf" for e in ALL_FOUR)
    summary = train(load_config(None, short_run(tmp_path, *AT_0, f"defense=[{entries}]")), tmp_path / "off", record_tap=("server",))
    seen, undefended = _seen_and_undefended(tmp_path / "off")
    assert torch.equal(seen, undefended)
    assert all(summary[f"{n}_epsilon"] is None for n in ("santext", "privtune", "dp_forward", "custext"))  # no guarantee


def test_dp_forward_noise_is_what_the_server_sees(tmp_path):
    """The twin of the test above: on, the rows the server receives are the clipped rows plus noise of the analytic
    Gaussian's std for 16 rows of norm ≤ clip (here ``at: last`` is the input of block 0: the cut is 0)."""
    summary = train(load_config(None, short_run(tmp_path, *AT_0, "defense=[{name: dp-forward, epsilon: 8, clip: 0.08, norm: row}]")),
                    tmp_path / "on", record_tap=("server",))
    seen, undefended = _seen_and_undefended(tmp_path / "on")
    reference, scale = clip_rows(undefended, 0.08)
    assert float(scale.min()) < 1  # the clip binds on some rows
    noise = seen - reference
    assert float(noise.std()) == pytest.approx(analytic_gaussian_sigma(8.0, 1e-5) * 2 * 0.08 * math.sqrt(16), rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * float(noise.std())
    assert summary["dp_forward_epsilon"] == 8.0


def test_all_four_compose_on_a_u_shape_with_int8_and_micro_batches_in_process_and_over_grpc(tmp_path):
    from served import serve_here
    from splittune.channels.grpc import GrpcChannel
    from splittune.deploy.service import SplitService
    from splittune.models.arch import detect_arch
    from splittune.models.zoo import resolve_model
    from splittune.parties import Server
    from splittune.privacy.attacks.base import run_attack
    from splittune.privacy.attacks.inversion import Inversion
    from splittune.privacy.judge import score
    from splittune.privacy.knowledge import PublicKnowledge
    from splittune.run import train_remote
    from splittune.schedules.policy import POLICIES

    entries = ", ".join(e % eps for e, eps in zip(ALL_FOUR, (400, 400, 64, 6)))
    run = short_run(tmp_path, "cuts=[1,2]", "codec.up=int8", "train.micro_batches=2", "train.steps=2", f"defense=[{entries}]")
    local = train(load_config(None, run), tmp_path / "local", record_tap=("server",))
    source = resolve_model(SMALLEST)
    server, port = serve_here(SplitService(Server(source, detect_arch(source.config()), wait_s=30, policies=POLICIES), None))
    try:
        remote = train_remote(load_config(None, run), tmp_path / "remote", 0, lambda i: GrpcChannel(f"grpc://127.0.0.1:{port}"))
    finally:
        server.stop(None)
    assert _losses(tmp_path / "local") == _losses(tmp_path / "remote")  # the same noise, the same substitutes: same run
    for name in ("santext", "privtune", "dp_forward", "custext"):
        assert local[f"{name}_epsilon"] is not None and remote[f"{name}_epsilon"] == local[f"{name}_epsilon"]
    tap = Tap.open(tmp_path / "local" / "tap" / "server")
    assert [d["name"] for d in tap.proposal()["defenses"]] == ["santext", "privtune", "dp-forward", "custext"]  # announced
    public = PublicKnowledge(SMALLEST, aux="builtin:sentiment")
    recovery = run_attack(Inversion({"aux_rows": 8, "random_rows": 4, "epochs": 1, "hidden": 16}), tap, public)
    scores = score(recovery, Truth.open(tmp_path / "local" / "tap" / "truth"), public.tokenizer)
    assert recovery.info["cut"] == 1 and 0.0 <= scores["token_accuracy"] <= 1.0
