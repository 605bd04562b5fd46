"""label-noise: noise on the gradient a U-shaped client's top sends the server (Li et al., ICLR'22). Marvell brings the
label-inference attack's leak AUC near chance; the noise lands only where the loss reaches, is centred on the clean
gradient and has the covariance it was solved for; at power 0 it changes no bit; the same defense_seed replays the
same noise; a two-part split (where the server holds the labels) is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from splittune.config import ConfigError, load_config
from splittune.defenses.label_noise import LabelNoise, loss_positions
from splittune.dpmath.mechanisms import answer_classes, marvell_variances
from splittune.cut.transforms import ChainError, Crossing, End
from splittune.privacy import judge
from splittune.privacy.attacks.base import run_attack
from splittune.privacy.attacks.label_inference import LabelInference, direction_scores
from splittune.privacy.knowledge import PublicKnowledge
from splittune.dpmath.metrics import leak_auc
from splittune.taps.tap import Tap, Truth
from splittune.run import train
from splittune.wire import Message

MODEL = "tiny:llama,layers=4,hidden=64,vocab=320"
BASE = [f"model={MODEL}", "data.source=builtin:sentiment", "train.batch_size=8", "train.seq_len=64",
        "train.warmup_steps=0", "train.lr=0.01", "data.max_eval_examples=2", "train.eval_batches=1", "train.threads=1",
        "cuts=[1,3]", "defense_seed=3"]
LONG = ["data.max_train_examples=64", "train.steps=8"]  # 64 scored rows: the leak AUC to within a few hundredths
SHORT = ["data.max_train_examples=16", "train.steps=2"]
MARVELL = "defense=[{name: label-noise, power: 16}]"
MAX_NORM = "defense=[{name: label-noise, method: max-norm}]"


def _run(tmp_path_factory, name, *sets):
    out = tmp_path_factory.mktemp(name)
    summary = train(load_config(None, [*BASE, *sets]), out, record_tap=("server",))
    return out, summary


def _grads(out) -> dict[int, torch.Tensor]:
    return {r.step: r.tensor("grad") for r in Tap.open(out / "tap" / "server").records("gradients", "up")}


def _leak(out, public) -> float:
    tap, truth = Tap.open(out / "tap" / "server"), Truth.open(out / "tap" / "truth")
    return judge.score(run_attack(LabelInference(), tap, public), truth, public.tokenizer)["leak_auc"]


def _prompt_leak(out, public) -> float:
    """The leak AUC (either orientation) of the direction split at the position just before each answer: a prompt
    position, which carries no loss of its own; its gradient comes through the top's attention."""
    tap, truth = Tap.open(out / "tap" / "server"), Truth.open(out / "tap" / "truth")
    positive = public.tokenizer("p", add_special_tokens=False)["input_ids"][0]
    vectors, classes = [], []
    for r in tap.records("gradients", "up"):
        labels = truth.batch(r.session, r.step, r.micro)["labels"]
        before = (loss_positions(labels).float().argmax(dim=1) - 1).clamp_min(0)
        vectors.append(r.tensor("grad")[torch.arange(labels.shape[0]), before])
        classes += judge.row_classes(labels, positive)
    scores, _ = direction_scores(torch.cat(vectors), torch.zeros(len(classes)))
    auc = leak_auc(scores.tolist(), classes)
    return max(auc, 1 - auc)


@pytest.fixture(scope="module")
def public():
    return PublicKnowledge(MODEL)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return _run(tmp_path_factory, "clean", *LONG)


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    return _run(tmp_path_factory, "short", *SHORT)


def test_marvell_hides_the_class_from_label_inference(tmp_path_factory, clean, public):
    undefended = _leak(clean[0], public)
    out, summary = _run(tmp_path_factory, "marvell", *LONG, MARVELL)
    defended = _leak(out, public)
    assert undefended >= 0.9
    assert defended <= 0.7 and undefended - defended >= 0.3  # measured over defense_seed 1..6: 1.00 -> 0.48-0.67
    # the positions before the answer tell the class too (which is why they are noised), and under marvell less
    assert _prompt_leak(clean[0], public) >= 0.9 and _prompt_leak(out, public) <= 0.7
    assert summary["privacy"]["defenses"] == [{"name": "label-noise", "method": "marvell", "power": 16.0}]
    assert not any(k.endswith("_epsilon") for k in summary)  # no ε is claimed
    assert summary["train_loss_last"] != clean[1]["train_loss_last"]  # the trunk trains with the noised gradient


def test_the_noise_lands_only_where_the_loss_reaches(tmp_path_factory, short):
    """Step 1's gradient is the pretrained model's in both runs: what the defense added is the difference. It is zero
    wherever the clean gradient is (padding, positions after the answer), bit for bit, and non-zero at every loss
    position; max-norm lifts every row's squared norm to the batch's largest."""
    clean_grad = _grads(short[0])[1]
    truth = Truth.open(short[0] / "tap" / "truth")
    labels = next(r for r in truth.records("batch") if r.step == 1).tensors()["labels"]
    reached = clean_grad.abs().amax(dim=-1) > 0
    for sets in (MARVELL, MAX_NORM):
        out, _ = _run(tmp_path_factory, "where", *SHORT, sets)
        noise = _grads(out)[1] - clean_grad
        changed = noise.abs().amax(dim=-1) > 0
        assert torch.equal(_grads(out)[1][~reached], clean_grad[~reached])
        assert not bool((changed & ~reached).any()) and bool((~reached).any())
        if sets == MARVELL:  # every position the loss reaches: the loss positions and the prompt before them
            assert bool(changed[reached].all()) and bool((reached & ~loss_positions(labels)).any())
        else:
            sq = (_grads(out)[1] ** 2).sum(dim=(1, 2))
            assert float(sq.min()) > 0.8 * float(sq.max())
            clean_sq = (clean_grad ** 2).sum(dim=(1, 2))
            assert float(clean_sq.min()) < 0.5 * float(clean_sq.max())  # the twin: the clean norms are far apart


def test_power_zero_changes_no_bit_and_the_seed_replays_the_noise(tmp_path_factory, short):
    base, base_summary = short
    off, off_summary = _run(tmp_path_factory, "off", *SHORT, "defense=[{name: label-noise, power: 0}]")
    base_tap, off_tap = Tap.open(base / "tap" / "server"), Tap.open(off / "tap" / "server")
    pairs = list(zip(base_tap.records(), off_tap.records(), strict=True))
    assert pairs and all(torch.equal(a.tensors()[k], b.tensors()[k]) for a, b in pairs for k in a.tensors())
    assert off_summary["train_loss_last"] == base_summary["train_loss_last"]
    assert off_summary["eval_loss_after"] == base_summary["eval_loss_after"]
    a, _ = _run(tmp_path_factory, "a", *SHORT, MARVELL)
    b, _ = _run(tmp_path_factory, "b", *SHORT, MARVELL)
    c, _ = _run(tmp_path_factory, "c", *SHORT, MARVELL, "defense_seed=4")
    ga, gb, gc = _grads(a), _grads(b), _grads(c)
    assert all(torch.equal(ga[s], gb[s]) for s in ga)
    assert "defense_seed" not in json.dumps(Tap.open(a / "tap" / "server").sessions)  # the secret stays with the client
    assert not torch.equal(ga[1], gc[1]) and not torch.equal(ga[1], _grads(base)[1])


def _crossing(grad, labels, step=1):
    return Crossing(Message("gradients", "s", step, 0, {"grad": grad.clone()}, {}), {"cut.labels": labels})


def _batch(gen, rows=8, seq=12, width=6):
    """Rows with an answer of 3 tokens (loss positions 8..10; the class: the answer's second token, 112 in the even
    rows and 110 in the odd ones, which spread three times as much), the loss reaching back to position 2."""
    labels = torch.full((rows, seq), -100)
    labels[:, 9] = 32
    labels[:, 10] = torch.where(torch.arange(rows) % 2 == 0, 112, 110)
    labels[:, 11] = 256
    grad = torch.zeros(rows, seq, width)
    spread = torch.where(torch.arange(rows) % 2 == 0, 0.1, 0.3)
    grad[:, 2:11] = torch.randn(rows, 9, width, generator=gen) * spread[:, None, None]
    grad[:, 9] += torch.where(torch.arange(rows) % 2 == 0, 1.0, -1.0)[:, None] * torch.linspace(-1, 1, width)
    return grad, labels


def test_marvell_noise_is_centred_and_has_the_covariance_it_solved_for():
    gen = torch.Generator().manual_seed(0)
    grad, labels = _batch(gen)
    defense = LabelNoise(power=2.0)
    defense.bind(5, "up.0.label-noise")
    draws = []
    for i in range(800):  # a training crossing's noise is keyed by its step: 800 steps, 800 draws
        c = _crossing(grad, labels, step=i + 1)
        defense.send(c, End())
        draws.append(c.msg.tensors["grad"] - grad)
    noise = torch.stack(draws).double()  # [draws, rows, seq, width]
    last = defense.last
    assert last["method"] == "marvell" and last["p"] == 0.5
    assert last["across0"] > 1e-3 and last["across1"] == 0  # the less spread class is lifted across Δ, the other not
    assert float(noise[:, :, :2].abs().max()) == 0 and float(noise[:, :, 11:].abs().max()) == 0  # where no loss reaches
    reached = noise[:, :, 2:11]
    z = reached.mean(0) / (reached.std(0) / len(draws) ** 0.5)
    assert float(z.abs().max()) < 5  # centred on the clean gradient: no value's mean is off by 5 standard errors
    classes = torch.arange(8) % 2 == 1  # class 1: the most frequent label where answers differ (a tie: the smaller id, 110)
    delta = grad[classes][:, 2:11].mean(0) - grad[~classes][:, 2:11].mean(0)
    unit = (delta / delta.norm()).double()
    for c, rows in ((1, classes), (0, ~classes)):
        flat = noise[:, rows][:, :, 2:11]
        along = (flat * unit).sum(dim=(-1, -2))
        across = flat - along[..., None, None] * unit
        gap = last["gap"]
        assert float(along.var()) == pytest.approx(last[f"along{c}"] * gap, rel=0.1)
        assert float(across.pow(2).sum(dim=(-1, -2)).mean()) / (unit.numel() - 1) == pytest.approx(
            last[f"across{c}"] * gap, rel=0.1, abs=1e-12)
    assert (1 - last["p"]) * (last["along0"] + (unit.numel() - 1) * last["across0"]) + last["p"] * (
        last["along1"] + (unit.numel() - 1) * last["across1"]) == pytest.approx(2.0, rel=1e-6)  # the budget, spent


def test_the_solver_matches_the_closed_form_and_spends_across_only_to_equalise():
    # no spread of its own: each class's noise along Δ only, sum KL = 1 / power at p = 1/2 (Li et al., eq. for u = v = 0)
    (a0, c0, a1, c1), kl = marvell_variances(0.0, 0.0, 1, 0.5, 4.0)
    assert a0 == pytest.approx(4.0, rel=1e-4) and a1 == pytest.approx(4.0, rel=1e-4) and kl == pytest.approx(0.25, rel=1e-6)
    # unbalanced classes: a brute-force search over the along split agrees
    p, power = 0.2, 3.0
    theta = np.linspace(1e-4, 1 - 1e-4, 200001)
    x, y = (1 - theta) * power / (1 - p), theta * power / p
    brute = float(np.min(0.5 * ((y + 1) / x + (x + 1) / y) - 1))
    assert marvell_variances(0.0, 0.0, 1, p, power)[1] == pytest.approx(brute, rel=1e-6)
    # equal spreads: nothing across Δ; unequal with budget to spare: the smaller one lifted to the larger
    (_, c0, _, c1), _ = marvell_variances(0.01, 0.01, 100, 0.5, 4.0)
    assert c0 == 0 and c1 == 0
    (_, c0, _, c1), _ = marvell_variances(0.01, 0.02, 100, 0.5, 50.0)
    assert c0 == pytest.approx(0.01, rel=1e-3) and c1 == 0
    assert marvell_variances(0.01, 0.01, 100, 0.5, 0.0)[1] > marvell_variances(0.01, 0.01, 100, 0.5, 1.0)[1]


def test_classes_come_from_the_answers():
    assert answer_classes([[32, 112, 5], [32, 110, 5], [32, 112, 5], [32]]) == [1, 0, 1, None]  # truncated: undecided
    assert answer_classes([[7, 1], [7, 2], [7, 3], [7, 2]]) == [0, 1, 0, 1]  # one-vs-rest: the most frequent
    assert answer_classes([[32, 112], [32, 112], []]) is None  # one class: marvell falls back to max-norm
    gen = torch.Generator().manual_seed(1)
    grad, labels = _batch(gen)
    labels[:, 10] = 112
    defense = LabelNoise(power=2.0)
    defense.bind(5, "x")
    sq = []
    for i in range(400):
        c = _crossing(grad, labels, step=i + 1)
        defense.send(c, End())
        sq.append((c.msg.tensors["grad"].double() ** 2).sum(dim=(1, 2)))
    assert defense.last["method"] == "max-norm"
    clean_sq = (grad.double() ** 2).sum(dim=(1, 2))
    assert torch.stack(sq).mean(0) == pytest.approx(clean_sq.max().expand(8), rel=0.03)  # each row: the largest, expected
    assert float(clean_sq.min()) < 0.5 * float(clean_sq.max())  # which the clean rows are far from


def test_it_acts_on_training_gradients_only_and_needs_the_labels():
    gen = torch.Generator().manual_seed(2)
    grad, labels = _batch(gen)
    defense = LabelNoise()
    defense.bind(5, "x")
    for msg in (Message("gradients", "s", 0, 0, {"grad": grad.clone()}, {}),  # an evaluation
                Message("activations", "s", 1, 0, {"hidden": grad.clone()}, {})):
        c = Crossing(msg, {"cut.labels": labels})
        defense.send(c, End())
        assert all(torch.equal(t, grad) for t in c.msg.tensors.values())
    with pytest.raises(ChainError, match="cut.labels"):
        defense.send(Crossing(Message("gradients", "s", 1, 0, {"grad": grad.clone()}, {})), End())
    assert defense.varies("grad", 6) and defense.varies("hidden", 6) is None
    with pytest.raises(ChainError, match="method"):
        LabelNoise(method="dp")


@pytest.mark.parametrize("sets, fragment", [
    (["cuts=[1]"], "two-part split"),
    (["cuts=[1,3]", "defense=[{name: label-noise, method: dp}]"], "max-norm"),
    (["cuts=[1,3]", "defense=[{name: label-noise, power: -1}]"], "power"),
])
def test_config_refuses_what_label_noise_cannot_do(sets, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [f"model={MODEL}", "defense=[{name: label-noise}]", *sets])
    for cuts in ([], ["cuts=[1,3]"]):  # the twin: auto cuts and [a, b] are U-shaped
        assert load_config(None, [f"model={MODEL}", *cuts, "defense=[{name: label-noise}]"]).defense[0].power == 4.0
