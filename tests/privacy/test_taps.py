"""Taps on disk hold exactly what each observer saw (after the codec), the client's truth is kept apart, and the
attack API takes a tap and public knowledge only."""

from __future__ import annotations

import json

import pytest
import torch

from splittune.config import load_config
from splittune.privacy.attacks.base import Attack, Recovery, run_attack
from splittune.privacy.knowledge import PublicKnowledge, ThreatModelError
from splittune.dpmath.metrics import leak_auc, mean_rouge_l_f1, rouge_l_f1, set_scores, token_accuracy
from splittune.taps.recording import parse_observers
from splittune.taps.tap import Tap, TapError, TapWriter, Truth
from splittune.run import train
from eavesdrop import frames_as_server_sees

MODEL = "tiny:llama,layers=3,hidden=32,heads=2,kv_heads=1,ffn=64"
BASE = [f"model={MODEL}", "train.steps=2", "train.batch_size=2", "train.seq_len=16", "train.warmup_steps=0", "train.lr=0.01",
        "data.max_train_examples=8", "data.max_eval_examples=2", "train.eval_batches=1"]


def _run(tmp_path_factory, name: str, *sets: str, observers=("server", "eavesdropper")):
    out = tmp_path_factory.mktemp(name)
    summary = train(load_config(None, [*BASE, *sets]), out, record_tap=observers)
    return out, summary


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    return _run(tmp_path_factory, "raw", "cuts=[1]")


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    return _run(tmp_path_factory, "int8", "cuts=[1]", "codec.up=int8")


def _training(tap: Tap, kind="activations", direction="up"):
    return [r for r in tap.records(kind, direction) if r.meta.get("train", True) is True]


def test_the_server_tap_holds_the_bottom_output_and_labels_that_crossed(raw_run):
    out, _ = raw_run
    tap, truth = Tap.open(out / "tap" / "server"), Truth.open(out / "tap" / "truth")
    public = PublicKnowledge(MODEL)
    bottom = public.segment(0, 1)
    records = _training(tap)
    assert [r.step for r in records] == [1, 2]
    for r in records:
        batch = truth.batch(r.session, r.step, r.micro)
        assert torch.equal(r.tensor("labels"), batch["labels"])  # the two-part split sends the labels
        assert torch.equal(r.tensor("attention_mask"), batch["attention_mask"])
        pretrained = bottom(batch["attention_mask"], input_ids=batch["input_ids"])
        close = torch.allclose(r.tensor("hidden"), pretrained, atol=1e-6)
        # step 1 runs the untrained bottom (LoRA B = 0): the pretrained output; by step 2 the adapters moved it
        assert close == (r.step == 1)


def test_the_server_tap_equals_the_frames_decoded_by_the_servers_chain(raw_run, int8_run):
    for out in (raw_run[0], int8_run[0]):
        seen = frames_as_server_sees(out)
        records = _training(Tap.open(out / "tap" / "server"))
        assert len(seen) == len(records) == 2
        for r in records:
            assert torch.equal(r.tensor("hidden"), seen[(r.step, r.micro)].tensors["hidden"])


def test_a_lossy_codec_changes_what_the_tap_holds(int8_run):
    out, _ = int8_run
    tap, truth = Tap.open(out / "tap" / "server"), Truth.open(out / "tap" / "truth")
    assert tap.chain()["up"][-1]["hidden"]["name"] == "int8"
    first = _training(tap)[0]
    batch = truth.batch(first.session, first.step, first.micro)
    sent = PublicKnowledge(MODEL).segment(0, 1)(batch["attention_mask"], input_ids=batch["input_ids"])
    arrived = first.tensor("hidden")
    err = (arrived - sent).abs().max().item()
    assert 0 < err < 0.05 * sent.abs().max().item()  # what arrives is the int8 decode, not what the client computed


def test_the_server_tap_holds_its_own_replies_adapters_and_session(raw_run):
    out, _ = raw_run
    tap = Tap.open(out / "tap" / "server")
    assert tap.proposal()["cuts"] == [1] and tap.proposal()["mode"] == "split"
    grads = _training(tap, "gradients", "down")
    assert len(grads) == 2 and grads[0].tensor("grad").shape == _training(tap)[0].tensor("hidden").shape
    adapters = list(tap.records("adapters"))
    assert [a.step for a in adapters] == [1, 2]
    first, second = adapters[0].tensors(), adapters[1].tensors()
    b = [k for k in first if "lora_B" in k]
    assert b and all(not first[k].any() for k in b)  # the state the step used: LoRA B still zero at step 1
    assert any(second[k].any() for k in b)


def test_the_sent_ledger_counts_every_training_frame(raw_run):
    out, summary = raw_run
    rows = [json.loads(line) for line in (out / "sent.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "hello"
    training = sum(r["frame_bytes"] for r in rows if r["kind"] in ("activations", "gradients", "step") and r["meta"].get("train", True))
    assert training == summary["bytes_up"]
    first = next(r for r in rows if r["kind"] == "activations")
    assert set(first["tensors"]) == {"attention_mask", "hidden", "labels"}  # metadata only: names, dtypes, shapes


def test_a_tap_is_bounded_and_says_what_it_dropped(tmp_path):
    writer = TapWriter(tmp_path / "t", "server", max_bytes=100)
    from splittune.wire import Message

    for step in (1, 2):
        writer("up", Message("activations", "s", step, 0, {"hidden": torch.ones(4, 4)}, {"train": True}), 90)
    writer.close()
    tap = Tap.open(tmp_path / "t")
    records = list(tap.records())
    assert [r.dropped for r in records] == [False, True] and tap.dropped == 1
    assert torch.equal(records[0].tensor("hidden"), torch.ones(4, 4))


def test_taps_refuse_what_they_are_not(raw_run, tmp_path):
    out, _ = raw_run
    with pytest.raises(TapError, match="judge's key"):
        Tap.open(out / "tap" / "truth")
    with pytest.raises(TapError, match="not the client's record"):
        Truth.open(out / "tap" / "server")
    with pytest.raises(TapError, match="holds no tap"):
        Tap.open(tmp_path)
    with pytest.raises(TapError, match="aggregator's"):
        Tap.open(out / "tap" / "server", observer="aggregator")
    with pytest.raises(TapError, match="already holds a tap"):
        TapWriter(out / "tap" / "server", "server")
    with pytest.raises(TapError, match="observers from server, aggregator, eavesdropper"):
        parse_observers("server,client")


class _Echo(Attack):
    name, target = "echo", "inputs"

    def recover(self, tap, public, progress):
        return Recovery(self.name, self.target)


def test_the_attack_api_takes_a_tap_and_public_knowledge_only(raw_run):
    out, _ = raw_run
    tap, public = Tap.open(out / "tap" / "server"), PublicKnowledge(MODEL)
    assert run_attack(_Echo(), tap, public).target == "inputs"
    from splittune.run import build

    client, *_ = build(load_config(None, [*BASE, "cuts=[1]"]))
    for bad_tap in (client.party, Truth.open(out / "tap" / "truth"), out / "tap" / "server"):
        with pytest.raises(ThreatModelError, match="recorded tap"):
            run_attack(_Echo(), bad_tap, public)
    with pytest.raises(ThreatModelError, match="PublicKnowledge"):
        run_attack(_Echo(), tap, client.party.model)
    with pytest.raises(ThreatModelError, match="run directory"):
        PublicKnowledge(str(out))  # a run's adapters are not public knowledge
    with pytest.raises(ThreatModelError, match="private data"):
        PublicKnowledge(MODEL, aux="builtin:shakespeare").check_disjoint(["builtin:shakespeare"])
    with pytest.raises(ThreatModelError, match="fingerprint"):
        run_attack(_Echo(), tap, PublicKnowledge("tiny:llama,layers=3,hidden=32,heads=2,kv_heads=1,ffn=64,seed=1"))


def test_metrics_match_rouge_score_and_hand_computed_values():
    assert rouge_l_f1("the cat sat on the mat", "the cat on mat") == pytest.approx(0.8)  # P 4/4, R 4/6
    assert rouge_l_f1("The Cat!", "the cat") == 1.0  # rouge-score's tokenizer: lowercase words, punctuation dropped
    assert rouge_l_f1("the cat", "dog") == 0.0
    assert mean_rouge_l_f1(["a b", "c d"], ["a b", "x y"]) == 0.5
    assert token_accuracy([1, 2, 3, 4], [1, 0, 3, 0], [True, True, True, False]) == (2, 3)
    assert set_scores([1, 2, 3, 4], [1, 2, 9]) == pytest.approx({"precision": 2 / 3, "recall": 0.5, "f1": 4 / 7})
    assert leak_auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert leak_auc([0.9, 0.8, 0.1, 0.2], [False, False, True, True]) == 0.0
    assert leak_auc([0.5, 0.5, 0.5], [True, False, False]) == 0.5  # ties count half
    assert leak_auc([0.3, 0.7, 0.5, 0.1], [True, True, False, False]) == 0.75
    with pytest.raises(ValueError, match="both classes"):
        leak_auc([0.1, 0.2], [True, True])
