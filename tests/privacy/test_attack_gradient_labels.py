"""gradient-labels: the gradient the client's top returns in the U-shaped split gives away its labels (the next
tokens, i.e. the text); noise in its place gives away nothing; a tap that does not fit is refused."""

from __future__ import annotations

import pytest
import torch

from splittune.config import load_config
from splittune.privacy.attacks.base import AttackError, run_attack
from splittune.privacy.attacks.gradient_labels import GradientLabels, linear_labels, norm_head
from splittune.privacy.judge import score
from splittune.privacy.knowledge import PublicKnowledge
from splittune.taps.tap import Tap, TapWriter, Truth
from splittune.run import train
from configs import SMALL, small

MODEL = SMALL
BASE = small("train.steps=2", "train.seq_len=32", "data.max_train_examples=8")
CHANCE = 1 / 259  # the byte-level tokenizer's vocabulary


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Recorded runs: the client's top frozen, trained with LoRA at a high learning rate (it drifts), and a top of
    only the final norm and head (cuts [1, 4])."""
    out = {}
    for name, sets in {"frozen": ["segments.top=frozen"], "lora": ["train.lr=0.01"], "head": ["cuts=[1,4]"]}.items():
        folder = tmp_path_factory.mktemp(name)
        train(load_config(None, [*BASE, *sets]), folder, record_tap=("server",))
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def public():
    return PublicKnowledge(MODEL)


def _copy(tap: Tap, folder, observer="server", grad=None, cuts=None) -> Tap:
    """The tap rewritten with TapWriter: optionally its gradients replaced, its proposal's cuts changed."""
    writer = TapWriter(folder, observer)
    writer.sessions = {s: dict(e) for s, e in tap.sessions.items()}
    if cuts is not None:
        for entry in writer.sessions.values():
            entry["proposal"] = {**entry["proposal"], "cuts": cuts}
    for r in tap.records():
        tensors = r.tensors()
        if r.kind == "gradients" and grad is not None:
            tensors = {k: grad(v) for k, v in tensors.items()}
        writer.add(r.direction, r.kind, r.session, r.step, r.micro, tensors, r.meta, r.frame_bytes)
    writer.close()
    return Tap.open(folder)


def _accuracy(folder, public, tap=None, **options):
    recovery = run_attack(GradientLabels(options), tap or Tap.open(folder / "tap" / "server"), public)
    return score(recovery, Truth.open(folder / "tap" / "truth"), public.tokenizer), recovery


def test_a_frozen_thin_top_gives_away_every_label(runs, public):
    result, recovery = _accuracy(runs["frozen"], public)
    assert recovery.info["method"] == "linear" and len(recovery.items) == 2
    assert result["per_step"]["1"]["token_accuracy"] >= 0.95
    assert result["token_accuracy"] >= 0.95
    assert all(f["solve_residual"] < 1e-2 for f in recovery.info["fits"])  # g = Bᵀe inverted through the block
    tokens = recovery.items[0].tokens
    assert (tokens[:, -1] == -1).all()  # the last position carries no label


def test_a_head_only_top_gives_away_every_label_exactly(runs, public):
    result, recovery = _accuracy(runs["head"], public)
    assert recovery.info["cut"] == 4 and all(f["solve_residual"] == 0.0 for f in recovery.info["fits"])  # nothing to invert
    assert result["token_accuracy"] == 1.0 and result["per_step"]["2"]["token_accuracy"] == 1.0


def test_a_trained_top_still_leaks_and_noise_leaks_nothing(runs, public, tmp_path):
    result, recovery = _accuracy(runs["lora"], public, method="matching", match_steps=20)  # BiSR(b) from the linear estimate
    assert result["per_step"]["1"]["token_accuracy"] >= 0.95  # step 1: LoRA's B is still 0
    assert result["token_accuracy"] > 0.5
    assert all(abs(f["scale_n"] - 62) < 8 for f in recovery.info["fits"])  # N: 2 rows x 31 loss tokens
    tap = Tap.open(runs["frozen"] / "tap" / "server")
    generator = torch.Generator().manual_seed(1)
    noise = _copy(tap, tmp_path / "noise", grad=lambda g: torch.randn(g.shape, generator=generator) * g.std())
    control, _ = _accuracy(runs["frozen"], public, tap=noise)
    assert control["token_accuracy"] < 10 * CHANCE


def test_the_per_position_test_is_exact_on_a_norm_and_head_top(public):
    """The linear path on the pretrained final norm + head, with the gradient of a sum cross-entropy over N."""
    norm, head = norm_head(public)
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(16, public.width, generator=generator) * 3
    y = torch.randint(0, 259, (16,), generator=generator)
    x = h.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(norm(x) @ head.T, y, reduction="sum") / 37.0
    (g,) = torch.autograd.grad(loss, x)
    g[5] = 0  # a position without loss
    got = linear_labels(norm, head, h, g, vocab=259)
    assert got[5] == -1
    keep = torch.arange(16) != 5
    assert torch.equal(got[keep], y[keep])
    noise = linear_labels(norm, head, h, torch.randn(h.shape, generator=generator), vocab=259)
    assert (noise == y).float().mean() < 0.2


def test_refusals(runs, public, tmp_path):
    tap = Tap.open(runs["frozen"] / "tap" / "server")
    two_part = _copy(tap, tmp_path / "two", cuts=[1])
    with pytest.raises(AttackError, match="u-shape.*two-part"):
        GradientLabels().check(two_part)
    with pytest.raises(AttackError, match="server"):
        GradientLabels().check(_copy(tap, tmp_path / "agg", observer="aggregator"))
    with pytest.raises(AttackError, match="method matching needs a top with blocks"):  # a norm + head top
        run_attack(GradientLabels({"method": "matching"}), _copy(tap, tmp_path / "head", cuts=[1, 4]), public)
    with pytest.raises(AttackError, match="unknown option"):
        GradientLabels({"stepz": 3})
