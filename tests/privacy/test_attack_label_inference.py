"""label-inference: the server of a U-shaped split infers each example's class from the gradient the client's top
sends back (Li et al., ICLR'22); on gradients replaced by noise it falls to chance; it refuses a two-part tap."""

from __future__ import annotations

import pytest
import torch

from splittune.config import load_config
from splittune.privacy import judge
from splittune.privacy.attacks.base import AttackError, run_attack
from splittune.privacy.attacks.label_inference import LabelInference, answer_positions, direction_scores
from splittune.privacy.knowledge import PublicKnowledge
from splittune.dpmath.metrics import leak_auc
from splittune.taps.tap import Tap, TapWriter, Truth
from splittune.run import train

MODEL = "tiny:llama,layers=4,hidden=64,vocab=320"
BASE = [f"model={MODEL}", "data.source=builtin:sentiment", "data.max_train_examples=32", "train.steps=4",
        "train.batch_size=8", "train.seq_len=64", "train.warmup_steps=0", "train.lr=0.01", "data.max_eval_examples=2",
        "train.eval_batches=1", "train.threads=1"]


@pytest.fixture(scope="module")
def public():
    return PublicKnowledge(MODEL)


@pytest.fixture(scope="module")
def u_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("u")
    train(load_config(None, [*BASE, "cuts=[1,3]"]), out, record_tap=("server",))
    return out


def _noised(src, dst) -> Tap:
    """A copy of the tap whose gradients are random noise of the same shape (nothing leaks)."""
    tap = Tap.open(src)
    writer = TapWriter(dst, "server")
    writer.sessions = tap.sessions
    gen = torch.Generator().manual_seed(1)
    for r in tap.records():
        tensors = r.tensors()
        if r.kind == "gradients" and r.direction == "up":
            tensors = {k: torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
        writer.add(r.direction, r.kind, r.session, r.step, r.micro, tensors, r.meta, r.frame_bytes)
    writer.close()
    return Tap.open(dst)


def test_the_gradient_leaks_the_class_and_noise_does_not(u_run, public, tmp_path):
    tap, truth = Tap.open(u_run / "tap" / "server"), Truth.open(u_run / "tap" / "truth")
    recovery = run_attack(LabelInference(), tap, public)
    assert recovery.target == "class" and recovery.info["score"] == "direction"
    assert recovery.positive == public.tokenizer("p", add_special_tokens=False)["input_ids"][0]  # byte-level: 'p'
    scored = judge.score(recovery, truth, public.tokenizer)
    assert scored["rows"] == 32 and 0 < scored["positive_share"] < 1
    assert scored["leak_auc"] >= 0.9
    classes = [c for item in recovery.items
               for c in judge.row_classes(truth.batch(item.session, item.step, item.micro)["labels"], recovery.positive)]
    norm_auc = leak_auc(recovery.info["norm_scores"], classes)
    assert 0 <= norm_auc <= 1  # reported alongside; the norm leaks only under class imbalance
    norm = run_attack(LabelInference({"score": "norm"}), tap, public)
    assert norm.info["score"] == "norm"
    assert judge.score(norm, truth, public.tokenizer)["leak_auc"] == pytest.approx(norm_auc)

    control = run_attack(LabelInference(), _noised(u_run / "tap" / "server", tmp_path / "noise"), public)
    assert 0.2 <= judge.score(control, truth, public.tokenizer)["leak_auc"] <= 0.8


def test_it_refuses_a_two_part_split_and_unknown_options(tmp_path_factory, public):
    out = tmp_path_factory.mktemp("two")
    train(load_config(None, [*BASE, "cuts=[1]", "train.steps=1", "data.max_train_examples=8"]), out,
          record_tap=("server",))
    with pytest.raises(AttackError, match="u-shape"):
        LabelInference().check(Tap.open(out / "tap" / "server"))
    with pytest.raises(AttackError, match="unknown option"):
        LabelInference({"nope": 1})


def test_scoring_on_synthetic_gradients():
    gen = torch.Generator().manual_seed(0)
    d, n = 16, 40
    axis = torch.randn(d, generator=gen)
    y = torch.rand(n, generator=gen) < 0.5
    g = torch.randn(n, d, generator=gen) * 0.3 + torch.where(y, -1.0, 1.0)[:, None] * axis + 0.5 * torch.randn(d, generator=gen)
    reference = torch.where(y, 1.0, -1.0) + torch.randn(n, generator=gen) * 3  # a weak public guess only orients
    scores, agree = direction_scores(g, reference)
    assert leak_auc(scores.tolist(), y.tolist()) > 0.95 and agree > 0
    flipped, _ = direction_scores(g, -reference)
    assert leak_auc(flipped.tolist(), y.tolist()) < 0.05

    # the answer: the first position whose gradient reaches the threshold (plus the label words' offset)
    grad = torch.zeros(2, 10, 4)
    grad[:, :6] = 0.01
    grad[0, 6:9] = 1.0
    grad[1, 4:6] = 1.0
    grad[1, 5] = 2.0
    mask = torch.ones(2, 10, dtype=torch.long)
    assert answer_positions(grad, mask).tolist() == [6, 4]
    assert answer_positions(grad, mask, offset=1).tolist() == [7, 5]
    assert answer_positions(grad, mask, offset=5).tolist() == [8, 5]  # never past the last position with a gradient
    assert answer_positions(grad, mask, position="max").tolist() == [6, 5]
