"""DP-SGD on the client's adapters: per-example gradients that sum to the step's gradient (pipelined split
backward included), clipping and noise as configured (nothing when set to nothing), the accountant's ε, and the
honest limit: it protects the adapters, not the activations the server inverts."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from splittune.config import ConfigError, load_config
from splittune.defenses.dp_sgd import DPSGD, DPError
from splittune.privacy.attacks.base import run_attack
from splittune.privacy.attacks.inversion import Inversion
from splittune.privacy.judge import score
from splittune.privacy.knowledge import PublicKnowledge
from splittune.taps.tap import Tap, Truth
from splittune.run import build, train
from configs import SMALL, small

MODEL = SMALL
BASE = small("train.steps=3", "train.batch_size=4", "train.seq_len=16", "data.max_train_examples=16")


def _batch(seed: int, rows: int = 4, seq: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 250, (rows, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a padded row
    labels = torch.where(mask.bool(), ids, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture
def dp_client():
    cfg = load_config(None, [*BASE, "train.micro_batches=2", "train.max_in_flight=2",  # pipelined: forwards interleave
                             "dp_sgd={noise_multiplier: 0.0, max_grad_norm: 1e9}", "defense_seed=7"])
    client, _, _, _ = build(cfg)
    generator = torch.Generator().manual_seed(1)
    client.party.load_state({k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in client.party.state().items()})
    return client


def test_per_example_gradients_sum_to_the_steps_gradient(dp_client):
    dp_client.backward(1, [_batch(0)])
    per = dp_client.defenses.find(DPSGD).per_example()
    grads = {name: p.grad.clone() for name, p in dp_client.defenses.find(DPSGD).params}
    assert len(per) == 8 and all(v.shape[0] == 4 for v in per.values())
    for name, g in grads.items():
        assert torch.allclose(per[name].sum(0), g, atol=1e-6 * float(g.abs().max()) + 1e-9), name
    name = next(iter(per))
    assert not torch.allclose(per[name][1], grads[name])  # the twin: one example is not the whole step
    dp_client.defenses.find(DPSGD).privatise()  # no noise, a clip nothing reaches: the gradient is the step's own
    for name, p in dp_client.defenses.find(DPSGD).params:
        assert torch.allclose(p.grad, grads[name], atol=1e-6 * float(grads[name].abs().max()) + 1e-9)


def test_each_example_is_clipped_and_the_noise_has_its_scale(dp_client):
    dp = dp_client.defenses.find(DPSGD)
    dp.clip = 1e-4
    dp_client.backward(1, [_batch(0)])
    info = dp.privatise()
    assert info["clipped"] == 1.0
    total = torch.sqrt(sum((p.grad.double() ** 2).sum() for _, p in dp.params))
    assert float(total) <= 1e-4 * (1 + 1e-6)  # the mean of clipped gradients has at most the clip's norm
    dp.sigma, dp.clip = 2.0, 1.0
    dp_client.backward(2, [_batch(1)])
    dp.privatise()
    noise = torch.cat([p.grad.flatten() for _, p in dp.params])
    assert float(noise.std()) == pytest.approx(2.0 / 4, rel=0.15)  # std σ·C over the 4 examples


def test_without_noise_or_clipping_the_run_is_unchanged_and_with_noise_it_is_not(tmp_path):
    plain = train(load_config(None, BASE), tmp_path / "plain")
    off = train(load_config(None, [*BASE, "dp_sgd={noise_multiplier: 0.0, max_grad_norm: 1e9}"]), tmp_path / "off")
    train(load_config(None, [*BASE, "dp_sgd={noise_multiplier: 1.0, max_grad_norm: 0.1}"]), tmp_path / "noisy")
    assert off["eval_loss_after"] == pytest.approx(plain["eval_loss_after"], abs=1e-5)

    def client_adapters(name):
        return load_file(tmp_path / name / "adapters" / "client.safetensors")

    def gap(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    reference = client_adapters("plain")
    assert gap(client_adapters("off"), reference) < 1e-6
    assert gap(client_adapters("noisy"), reference) > 1e-4  # AdamW moves every noised entry by about the learning rate


def test_the_epsilon_is_opacus_and_meets_the_target(tmp_path):
    summary = train(load_config(None, [*BASE, "dp_sgd={target_epsilon: 4.0}"]), tmp_path / "run")
    figures = summary["privacy"]["dp_sgd"]
    accountant = RDPAccountant()
    accountant.history = [(figures["noise_multiplier"], 4 / 16, 3)]  # batch 4 of 16 examples, 3 steps
    assert figures["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert summary["dp_sgd_epsilon"] <= 4.0 + 0.05  # opacus' search stops within its tolerance
    assert summary["dp_sgd_epsilon"] == max(figures["epsilon"], figures["epsilon_without_amplification"])


def test_dp_sgd_protects_the_adapters_not_the_activations(tmp_path):
    """The inversion reads the server's tap as well under DP-SGD as without: the activations are not its concern."""
    run = [f"model={MODEL}", "cuts=[1,3]", "train.steps=2", "train.batch_size=2", "train.seq_len=32", "train.warmup_steps=0",
           "data.source=builtin:shakespeare", "data.max_train_examples=16", "data.max_eval_examples=2", "train.eval_batches=1",
           "dp_sgd={noise_multiplier: 4.0, max_grad_norm: 0.01}"]
    train(load_config(None, run), tmp_path / "dp", record_tap=("server",))
    public = PublicKnowledge(MODEL, aux="builtin:sentiment")
    recovery = run_attack(Inversion({"aux_rows": 24, "random_rows": 8, "epochs": 2}), Tap.open(tmp_path / "dp" / "tap" / "server"), public)
    assert score(recovery, Truth.open(tmp_path / "dp" / "tap" / "truth"), public.tokenizer)["token_accuracy"] > 0.8


@pytest.mark.parametrize("sets, fragment", [
    (["dp_sgd={max_grad_norm: 1.0}"], "either noise_multiplier or target_epsilon"),
    (["dp_sgd={noise_multiplier: 1.0, target_epsilon: 3.0}"], "either noise_multiplier or target_epsilon"),
    (["dp_sgd={target_epsilon: 0}"], "dp_sgd.target_epsilon"),
    (["mode=centralized", "dp_sgd={noise_multiplier: 1.0}"], "shares nothing"),
])
def test_config_errors(sets, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [*BASE, *sets])


def test_a_fully_trained_segment_is_refused(tmp_path):
    with pytest.raises(DPError, match="another trained weight"):
        train(load_config(None, [*BASE, "segments.bottom=full", "dp_sgd={noise_multiplier: 1.0}"]), tmp_path / "x")
