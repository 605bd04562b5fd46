"""Frames: exact round trips, dtype preserved, and every corruption refused with a reason (contract 5)."""

import msgpack
import pytest
import torch

from splittune.wire import FrameError, FrameLimits, Message, decode_frame, encode_frame
from splittune.wire.frames import MAGIC


def sample():
    return Message("activations", "abc", 7, 1, {"hidden": torch.randn(2, 3, 4), "half": torch.randn(3).bfloat16(),
                                              "mask": torch.ones(2, 3, dtype=torch.long), "empty": torch.zeros(0, 5)}, {"train": True, "x": 1.5})


def test_round_trip_is_exact_and_sized():
    msg = sample()
    frame = encode_frame(msg)
    back = decode_frame(frame)
    assert (back.kind, back.session, back.step, back.micro, back.meta) == ("activations", "abc", 7, 1, {"train": True, "x": 1.5})
    for name, t in msg.tensors.items():
        assert back.tensors[name].dtype == t.dtype and torch.equal(back.tensors[name], t)
    payload = 2 * 3 * 4 * 4 + 3 * 2 + 2 * 3 * 8
    assert 0 < len(frame) - payload < 100 * len(msg.tensors)  # the header: about 80 bytes per tensor


def _rebuild(header: dict, payload: bytes) -> bytes:
    raw = msgpack.packb(header, use_bin_type=True)
    return MAGIC + len(raw).to_bytes(4, "little") + raw + payload


def _parts(frame: bytes):
    n = int.from_bytes(frame[4:8], "little")
    return msgpack.unpackb(frame[8 : 8 + n]), frame[8 + n :]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda h: h.update(kind="exec"), "unknown kind 'exec'"),
        (lambda h: h["tensors"][0].update(dtype="object"), "dtype 'object' is not one of"),
        (lambda h: h["tensors"][0].update(shape=[2, 3, 5]), "needs 120"),
        (lambda h: h["tensors"][0].update(shape=[-1, 3, 4]), "non-negative integers"),
        (lambda h: h["tensors"][0].update(nbytes=10**9), "run past the frame"),
        (lambda h: h.update(step=-3), "step must be a non-negative integer"),
        (lambda h: h.update(extra=1), "header fields"),
        (lambda h: h["tensors"][0].update(codec="pickle"), "unknown codec 'pickle'"),
        (lambda h: h["tensors"].append(dict(h["tensors"][0])), "run past the frame|appears twice"),
    ],
)
def test_corrupt_headers_are_refused(mutate, reason):
    header, payload = _parts(encode_frame(Message("activations", "s", 0, 0, {"h": torch.zeros(2, 3, 4)})))
    mutate(header)
    with pytest.raises(FrameError, match=reason):
        decode_frame(_rebuild(header, payload))


def test_truncated_and_garbage_frames():
    frame = encode_frame(sample())
    with pytest.raises(FrameError, match="bad magic"):
        decode_frame(b"PK\x03\x04" + frame[4:])
    with pytest.raises(FrameError, match="runs past the end|run past the frame"):
        decode_frame(frame[: len(frame) // 2])
    with pytest.raises(FrameError, match="beyond its declared tensors"):
        decode_frame(frame + b"\0")
    with pytest.raises(FrameError, match="shorter than a frame header"):
        decode_frame(b"ST")
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode_frame(frame, FrameLimits(max_frame_bytes=64))
    with pytest.raises(FrameError, match="not valid msgpack"):
        decode_frame(MAGIC + (3).to_bytes(4, "little") + b"\xc1\xc1\xc1")


def test_server_refuses_bad_tensors_and_keeps_serving():
    from splittune.config import load_config
    from splittune.run import build

    client, server, channel, _ = build(load_config(None, ["model=tiny:llama", "cuts=[1,3]"]))
    good = torch.randn(1, 4, 64)
    mask = torch.ones(1, 4, dtype=torch.long)
    cases = [
        ({"hidden": torch.full((1, 4, 64), float("nan")), "attention_mask": mask}, "contains NaN or Inf"),
        ({"hidden": torch.randn(1, 4, 32), "attention_mask": mask}, r"expected \[batch, seq, 64\]"),
        ({"hidden": good.double(), "attention_mask": mask}, "this session uses torch.float32"),
        ({"hidden": good, "attention_mask": mask * 2}, "only 0 and 1"),
        ({"hidden": good}, "attention_mask must be int64"),
    ]
    for tensors, reason in cases:
        reply = server.handle(Message("activations", client.session, 1, 0, tensors, {"train": True}))
        assert reply.kind == "error" and __import__("re").search(reason, reply.meta["reason"]), reply.meta
    assert server.handle(Message("gradients", client.session, 5, 0, {"grad": good})).meta["reason"].startswith("gradients for step 5")
    assert "unknown session" in server.handle(Message("activations", "intruder", 1, 0, {"hidden": good})).meta["reason"]
    # nothing was half-done: a real step still works
    batch = {"input_ids": torch.randint(3, 200, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    assert client.train_step(1, [batch]).loss > 0


def test_model_mismatch_is_refused():
    from splittune.channels import LocalChannel, RemoteError
    from splittune.config import load_config
    from splittune.models.arch import detect_arch
    from splittune.models.zoo import resolve_model
    from splittune.cut import CutLink, ServerLink
    from splittune.parties import Client, Party, Server, SessionSpec
    from splittune.schedules.policy import POLICIES

    cfg = load_config(None, ["model=tiny:llama", "cuts=[1,3]"])
    source, other = resolve_model("tiny:llama"), resolve_model("tiny:llama,seed=1")
    spec = detect_arch(source.config())
    session = SessionSpec.from_run(cfg, other.fingerprint(), spec.model_type)
    server = Server(source, spec, policies=POLICIES)
    client = Client(Party("client", source, spec, session), CutLink(LocalChannel(ServerLink(server.handle).serve), "s"))
    with pytest.raises(RemoteError, match="model mismatch"):
        client.connect()


def test_state_frames_of_a_large_model_fit():
    """A 30-block server with LoRA on two projections sends 104+ tensors in one state message."""
    msg = Message("state", "s", 0, 0, {f"model.layers.{i}.q_proj.lora_{ab}.weight": torch.zeros(8, 4) for i in range(300) for ab in "AB"})
    assert len(decode_frame(encode_frame(msg)).tensors) == 600
