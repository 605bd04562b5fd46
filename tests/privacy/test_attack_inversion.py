"""The learned inversion (SIP) and the optimization attack recover a tiny run's private text from the server's
tap, fall to chance on a twin tap whose activations are noise, and refuse taps and knowledge that do not fit."""

from __future__ import annotations

import pytest
import torch

from splittune.config import load_config
from splittune.privacy.attacks.base import AttackError, run_attack
from splittune.privacy.attacks.inversion import Inversion
from splittune.privacy.attacks.optimization import Optimization
from splittune.privacy.judge import score
from splittune.privacy.knowledge import PublicKnowledge, ThreatModelError
from splittune.taps.tap import Tap, TapWriter, Truth
from splittune.run import train
from configs import SMALL, small

MODEL = SMALL
OTHER = "tiny:llama,layers=3,hidden=32,heads=2,kv_heads=1,ffn=64"
RUN = small("codec.up=int8", "train.steps=3", "train.seq_len=32", "data.max_train_examples=16")
FAST = {"aux_rows": 24, "random_rows": 8, "epochs": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("inversion")
    train(load_config(None, RUN), out, record_tap=("server",))
    tap, truth = Tap.open(out / "tap" / "server"), Truth.open(out / "tap" / "truth")
    noise = TapWriter(out / "noise", "server")  # the twin: same session and shapes, activations that carry nothing
    noise.sessions = {k: dict(v) for k, v in tap.sessions.items()}
    g = torch.Generator().manual_seed(1)
    for r in tap.records():
        tensors = r.tensors()
        if "hidden" in tensors:
            tensors["hidden"] = torch.randn(tensors["hidden"].shape, generator=g) * tensors["hidden"].float().std()
        noise.add(r.direction, r.kind, r.session, r.step, r.micro, tensors, r.meta, r.frame_bytes)
    noise.close()
    return tap, Tap.open(out / "noise"), truth, PublicKnowledge(MODEL, aux="builtin:sentiment")


def _accuracy(attack, tap, truth, public):
    result = score(run_attack(attack, tap, public), truth, public.tokenizer)
    return result["token_accuracy"], result


@pytest.mark.parametrize("options", [{}, {"model": "linear"}, {"model": "linear", "head": "free", "aux_rows": 64, "epochs": 8}])
def test_inversion_recovers_the_text_and_falls_to_chance_on_noise(run, options):
    tap, noise, truth, public = run
    attack, control = ({**FAST, **options},) * 2
    accuracy, result = _accuracy(Inversion(attack), tap, truth, public)
    chance, _ = _accuracy(Inversion(control), noise, truth, public)
    assert accuracy > 0.8 and result["rouge_l_f1"] > 0.5
    assert chance < 0.25 and accuracy > chance + 0.6
    assert sorted(result["per_step"]) == ["1", "2", "3"]  # every training step by default


def test_optimization_matches_activations_from_random_and_from_the_inverter(run):
    tap, noise, truth, public = run
    for options in ({"init": "random", "iterations": 40}, {"init": "inversion", "iterations": 5, "inversion": FAST}):
        accuracy, result = _accuracy(Optimization(options), tap, truth, public)
        chance, _ = _accuracy(Optimization(options), noise, truth, public)
        assert accuracy > 0.8 and chance < 0.25, (options, accuracy, chance)
        assert sorted(result["per_step"]) == ["1", "2", "3"]  # first, middle and last training step


def test_optimization_attacks_the_steps_asked_for(run):
    tap, _, truth, public = run
    recovery = run_attack(Optimization({"init": "random", "iterations": 2, "steps": [2]}), tap, public)
    assert {item.step for item in recovery.items} == {2}


def test_options_and_taps_that_do_not_fit_are_refused(run, tmp_path):
    tap, _, _, public = run
    with pytest.raises(AttackError, match="unknown option 'layers'.*options: model, head"):
        Inversion({"layers": 2})
    with pytest.raises(AttackError, match="unknown option 'iters'.*iterations"):
        Optimization({"iters": 2})
    with pytest.raises(AttackError, match="attack inversion: unknown option 'depth'"):
        Optimization({"inversion": {"depth": 2}})
    writer = TapWriter(tmp_path / "aggregator", "aggregator")
    writer.sessions = {k: dict(v) for k, v in tap.sessions.items()}
    writer.close()
    for attack in (Inversion(), Optimization()):
        with pytest.raises(AttackError, match="server's tap"):
            attack.check(Tap.open(tmp_path / "aggregator"))
    with pytest.raises(ThreatModelError, match="fingerprint"):
        run_attack(Inversion(FAST), tap, PublicKnowledge(OTHER, aux="builtin:sentiment"))
