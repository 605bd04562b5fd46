"""Wire codecs: round trips, exact byte counts, error bounds, option checks, and hostile frames refused by field."""

import math
import random
import warnings

import msgpack
import pytest
import torch

from splittune.wire import CODECS, FrameError, FrameLimits, Message, decode_frame, encode_frame, make_codec
from splittune.wire.codecs import topk_k
from splittune.wire.frames import MAGIC

SPECS = ["raw", "fp16", "bf16", "int8", {"name": "int8", "scales": "float16"}, {"name": "int8", "stochastic": True},
         "int4", {"name": "int4", "group": 64}, "topk", {"name": "topk", "fraction": 1}, {"name": "topk", "fraction": 0.01}]
SHAPES = [(4, 16, 24), (37,), (), (0,), (0, 5), (5, 0), (3, 5, 33)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ident(spec):
    if isinstance(spec, int):
        return str(spec)
    return spec if isinstance(spec, str) else "-".join(f"{v}" for v in spec.values())


def one(t, spec, **kw):
    return encode_frame(Message("activations", "s", 1, 0, {"h": t}), {"h": spec}, **kw)


def parts(frame: bytes):
    n = int.from_bytes(frame[4:8], "little")
    return msgpack.unpackb(frame[8 : 8 + n]), frame[8 + n :]


def rebuild(header: dict, payload: bytes) -> bytes:
    raw = msgpack.packb(header, use_bin_type=True)
    return MAGIC + len(raw).to_bytes(4, "little") + raw + payload


@pytest.fixture(autouse=True)
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.frombuffer on a read-only buffer warns: it must never happen
        yield


# -- round trips ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=ident)
def test_round_trips_every_shape_and_dtype(spec):
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for shape in SHAPES:
            t = torch.randn(shape, generator=gen).to(dtype)
            sent = {}
            frame = one(t, spec, decoded=sent, generator=gen)
            back = decode_frame(frame).tensors["h"]
            assert back.dtype == dtype and back.shape == t.shape, (spec, dtype, shape)
            assert torch.equal(back, sent["h"]), "the sender's view of what it sent is the receiver's, bit for bit"
            assert torch.equal(decode_frame(bytearray(frame)).tensors["h"], back)
            header, payload = parts(frame)
            assert header["tensors"][0]["nbytes"] == len(payload)
            assert header["tensors"][0]["codec"] == make_codec(spec).name


def test_raw_is_bit_exact_and_a_lossy_codec_is_detectably_not():
    t = torch.randn(4, 16, 24)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = t.to(dtype)
        assert torch.equal(decode_frame(one(x, "raw")).tensors["h"].view(torch.uint8), x.view(torch.uint8))
    for spec in SPECS[1:]:
        if spec == {"name": "topk", "fraction": 1}:
            continue
        assert not torch.equal(decode_frame(one(t, spec)).tensors["h"], t), spec
    assert torch.equal(decode_frame(one(t, {"name": "topk", "fraction": 1})).tensors["h"], t)


def test_integer_and_bool_tensors_go_raw_only():
    msg = Message("activations", "s", 1, 0, {"h": torch.randn(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long)})
    back = decode_frame(encode_frame(msg, {"h": "int8"})).tensors
    assert back["attention_mask"].dtype == torch.long and torch.equal(back["attention_mask"], msg.tensors["attention_mask"])
    for dtype in (torch.long, torch.int32, torch.bool, torch.uint8):
        with pytest.raises(ValueError, match="tensor 'attention_mask' is .*codec int4 carries only floating tensors"):
            encode_frame(Message("activations", tensors={"attention_mask": torch.ones(2, 3, dtype=dtype)}), {"attention_mask": "int4"})
    assert decode_frame(encode_frame(msg, {"h": "raw", "attention_mask": "raw", "absent": "int8"})).tensors.keys() == msg.tensors.keys()


# -- byte counts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, nbytes", [
    ("raw", 4 * 128 * 576 * 4),
    ("fp16", 4 * 128 * 576 * 2),
    ("bf16", 4 * 128 * 576 * 2),
    ("int8", 4 * 128 * 576 + 4 * 128 * 4),
    ({"name": "int8", "scales": "float16"}, 4 * 128 * 576 + 4 * 128 * 2),
    ("int4", 4 * 128 * 576 // 32 * (2 + 16)),
    ({"name": "int4", "group": 64}, 4 * 128 * 576 // 64 * (2 + 32)),
    ("topk", math.ceil(0.1 * 4 * 128 * 576) * (4 + 4)),
    ({"name": "topk", "fraction": 0.01}, math.ceil(0.01 * 4 * 128 * 576) * (4 + 4)),
], ids=ident)
def test_exact_payload_bytes(spec, nbytes):
    header, payload = parts(one(torch.randn(4, 128, 576), spec))
    assert len(payload) == header["tensors"][0]["nbytes"] == nbytes
    assert make_codec(spec).encoded_size(torch.float32, (4, 128, 576), header["tensors"][0]["params"]) == nbytes


def test_byte_counts_of_odd_shapes():
    def size(t, spec):
        return len(parts(one(t, spec))[1])

    assert size(torch.randn(5, 7), "int4") == 2 * 2 + 2 * 16  # 35 elements: two groups, the last padded
    assert size(torch.randn(5, 7).bfloat16(), "int8") == 35 + 5 * 4
    assert size(torch.randn(5, 0), "int8") == 5 * 4  # five empty tokens still carry their (zero) scales
    assert size(torch.randn(()), "int8") == 1 + 4
    assert size(torch.randn(10).bfloat16(), {"name": "topk", "fraction": 0.1}) == 1 * (4 + 2)
    assert (topk_k(0.1, 10), topk_k(0.3, 10), topk_k(0.1, 4096), topk_k(1, 7), topk_k(0.5, 0)) == (1, 3, 410, 7, 0)


# -- error bounds --------------------------------------------------------------------------------------------
def activation(*shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    x[..., 5] *= 50  # an outlier channel
    return x


@pytest.mark.parametrize("scales", ["float32", "float16"])
def test_int8_error_is_at_most_half_a_scale(scales):
    for dtype in DTYPES:
        x = activation(4, 32, 96).to(dtype)
        back = decode_frame(one(x, {"name": "int8", "scales": scales})).tensors["h"]
        scale = (x.float().abs().amax(-1, keepdim=True) / 127).to(getattr(torch, scales)).float()
        slack = 0 if dtype == torch.float32 else x.float().abs() * 2.0 ** -7  # the decode rounds back to bf16/fp16
        assert ((back.float() - x.float()).abs() <= scale / 2 * (1 + 1e-6) + slack).all()


def test_int4_error_is_at_most_half_a_group_scale():
    for group in (32, 64):
        x = activation(3, 50)  # 150 elements: the last group is padded
        back = decode_frame(one(x, {"name": "int4", "group": group})).tensors["h"]
        flat = torch.nn.functional.pad(x.reshape(-1), (0, -150 % group)).view(-1, group)
        scale = (flat.abs().amax(1, keepdim=True) / 7).half().float()
        err = torch.nn.functional.pad((back - x).reshape(-1), (0, -150 % group)).view(-1, group)
        assert (err.abs() <= scale / 2 * (1 + 1e-6)).all()
        assert (back - x).abs().max() > 0


def test_topk_keeps_the_largest_magnitudes_exactly():
    for dtype in DTYPES:
        x = activation(4, 8, 30).to(dtype)
        back = decode_frame(one(x, {"name": "topk", "fraction": 0.05})).tensors["h"]
        kept = back != 0
        assert int(kept.sum()) == math.ceil(0.05 * x.numel())
        assert torch.equal(back[kept], x[kept]) and (back[~kept] == 0).all()
        assert x[kept].abs().min() >= x[~kept].abs().max()


def test_cast_bounds_and_the_fp16_clamp():
    x = activation(4, 8, 30)
    for spec, rel in (("bf16", 2.0 ** -8), ("fp16", 2.0 ** -11)):
        back = decode_frame(one(x, spec)).tensors["h"]
        assert back.dtype == torch.float32
        assert ((back - x).abs() <= x.abs() * rel + 1e-7).all()
    odd = torch.tensor([1e6, -1e6, 65519.0, 65520.0, float("inf"), -float("inf"), float("nan"), 3.0])
    back = decode_frame(one(odd, "fp16")).tensors["h"]
    assert back[:4].tolist() == [65504.0, -65504.0, 65504.0, 65504.0]  # clamped, not turned into inf
    assert back[4] == float("inf") and back[5] == -float("inf") and back[6].isnan() and back[7] == 3.0
    big = decode_frame(one(torch.tensor([3.4e38, -3.4e38], dtype=torch.float32), "bf16")).tensors["h"]
    assert torch.isfinite(big).all()
    assert torch.isfinite(decode_frame(one(torch.tensor([1e300], dtype=torch.float64), "fp16")).tensors["h"]).all()


def test_stochastic_int8_is_unbiased_and_seeded():
    row = torch.linspace(-1, 1, 101)
    rows = row.repeat(4000, 1)  # one scale for every row: 4000 independent draws of each value
    scale = float(row.abs().max() / 127)
    gen = torch.Generator().manual_seed(0)
    draws = decode_frame(one(rows, {"name": "int8", "stochastic": True}, generator=gen)).tensors["h"]
    assert ((draws - rows).abs() < scale * (1 + 1e-6)).all()
    bias = (draws - rows).mean(0)
    assert bias.abs().max() < 5 * scale / 2 / math.sqrt(4000)  # unbiased per value (5 sigma)
    assert abs(float(bias.mean())) < scale / 100
    nearest = decode_frame(one(rows, "int8")).tensors["h"]
    assert (nearest - rows).mean(0).abs().max() > 0.3 * scale  # the deterministic rounding is biased per value
    a, b = (one(rows[:8], {"name": "int8", "stochastic": True}, generator=torch.Generator().manual_seed(s)) for s in (1, 1))
    assert a == b and a != one(rows[:8], {"name": "int8", "stochastic": True}, generator=torch.Generator().manual_seed(2))


# -- memory: no aliasing of what either side mutates later ------------------------------------------------------
def test_decoded_tensors_never_alias_the_sender_or_an_immutable_frame():
    x = torch.randn(64, 8)
    before = x.clone()
    frame = one(x, "raw")
    x.add_(1)  # the sender reuses its tensor
    back = decode_frame(frame).tensors["h"]
    assert torch.equal(back, before)
    back.zero_()  # the receiver writes to its tensor: the bytes frame is untouched
    assert torch.equal(decode_frame(frame).tensors["h"], before)
    writable = bytearray(frame)
    shared = decode_frame(writable).tensors["h"]  # a bytearray is lent to the raw tensor, not copied
    shared[0, 0] = 42.0
    assert decode_frame(writable).tensors["h"][0, 0] == 42.0
    with pytest.raises(BufferError):
        writable += b"x"  # and cannot be resized under it


# -- options -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, reason", [
    ("zstd", "unknown codec 'zstd'; codecs: raw, fp16, bf16, int8, int4, topk"),
    ({"stochastic": True}, "a codec map needs 'name'"),
    (3, "a codec is a name or a map"),
    ({"name": "int8", "bits": 4}, r"int8: option 'bits' is unknown; allowed: scales, stochastic"),
    ({"name": "int8", "stochastic": "yes"}, r"int8: option 'stochastic' = 'yes' is not allowed; allowed values: false or true"),
    ({"name": "int8", "stochastic": 1}, r"option 'stochastic' = 1 is not allowed"),
    ({"name": "int8", "scales": "bfloat16"}, r"option 'scales' = 'bfloat16' is not allowed; allowed values: 'float32' or 'float16'"),
    ({"name": "int4", "group": 48}, r"int4: option 'group' = 48 is not allowed; allowed values: 32 or 64"),
    ({"name": "topk", "fraction": 0}, r"topk: option 'fraction' = 0 is not allowed; allowed values: a number in \(0, 1\]"),
    ({"name": "topk", "fraction": 1.5}, r"option 'fraction' = 1.5 is not allowed"),
    ({"name": "topk", "fraction": True}, r"option 'fraction' = true is not allowed"),
    ({"name": "raw", "fraction": 0.1}, r"raw: option 'fraction' is unknown; allowed: none"),
])
def test_option_errors_name_the_option_and_the_allowed_values(spec, reason):
    with pytest.raises(ValueError, match=reason):
        make_codec(spec)
    if isinstance(spec, dict) and "name" in spec:
        with pytest.raises(ValueError, match="tensor 'h': (.* )?" + reason):
            one(torch.randn(3), spec)


def test_codec_specs_round_trip():
    assert set(CODECS) == {"raw", "fp16", "bf16", "int8", "int4", "topk"}
    for spec in SPECS:
        codec = make_codec(spec)
        assert make_codec(codec.spec()) == codec and make_codec(codec) is codec
    assert make_codec({"name": "int8"}).spec() == {"name": "int8", "scales": "float32", "stochastic": False}


def test_scaled_codecs_refuse_non_finite_input():
    for spec in ("int8", "int4"):
        with pytest.raises(ValueError, match=f"tensor 'h': {spec} cannot carry NaN or Inf"):
            one(torch.tensor([1.0, float("nan")]), spec)
    assert decode_frame(one(torch.tensor([1.0, float("nan")]), "topk")).tensors["h"][1].isnan()


# -- hostile frames ------------------------------------------------------------------------------------------
def hostile(spec, mutate_header=None, mutate_payload=None, t=None):
    t = torch.randn(4, 64) if t is None else t
    header, payload = parts(one(t, spec))
    payload = bytearray(payload)
    if mutate_header:
        mutate_header(header["tensors"][0])
    if mutate_payload:
        payload = mutate_payload(payload)
    return rebuild(header, bytes(payload))


def put(offset, data):
    def f(p):
        p[offset : offset + len(data)] = data
        return p
    return f


I32 = lambda *v: b"".join(int(x).to_bytes(4, "little", signed=True) for x in v)  # noqa: E731
F32 = lambda v: torch.tensor([v], dtype=torch.float32).numpy().tobytes()  # noqa: E731
F16 = lambda v: torch.tensor([v], dtype=torch.float16).numpy().tobytes()  # noqa: E731


@pytest.mark.parametrize("frame, reason", [
    (lambda: hostile("int8", lambda e: e["params"].clear()), r"int8 params\.scales is missing; allowed values: 'float32' or 'float16'"),
    (lambda: hostile("int8", lambda e: e["params"].update(bits=4)), r"int8 params\.bits is unknown; allowed: scales"),
    (lambda: hostile("int8", lambda e: e["params"].update(scales="float64")), r"params\.scales = 'float64' is not allowed"),
    (lambda: hostile("int4", lambda e: e["params"].update(group="32")), r"int4 params\.group = '32' is not allowed; allowed values: 32 or 64"),
    (lambda: hostile("int4", lambda e: e["params"].update(group=16)), r"params\.group = 16 is not allowed"),
    (lambda: hostile("topk", lambda e: e["params"].update(k=-1)), r"topk params\.k = -1 is not allowed; allowed values: a non-negative integer"),
    (lambda: hostile("topk", lambda e: e["params"].update(k=True)), r"params\.k = true is not allowed"),
    (lambda: hostile("topk", lambda e: e["params"].update(k=2.0)), r"params\.k = 2.0 is not allowed"),
    (lambda: hostile("raw", lambda e: e["params"].update(k=1)), r"raw params\.k is unknown; allowed: none"),
    (lambda: hostile("int8", lambda e: e.update(params=[1])), r"params must be a map"),
    (lambda: hostile("topk", lambda e: e["params"].update(k=300)), r"topk params\.k = 300 exceeds the tensor's 256 elements"),
    (lambda: hostile("int8", lambda e: e.update(nbytes=e["nbytes"] - 1), lambda p: p[:-1]), r"nbytes 271 for int8 of float32\[4, 64\], which needs 272"),
    (lambda: hostile("int4", lambda e: e.update(nbytes=e["nbytes"] + 2), lambda p: p + b"\0\0"), r"which needs 144"),
    (lambda: hostile("topk", lambda e: e["params"].update(k=25)), r"nbytes 208 for topk of float32\[4, 64\], which needs 200"),
    (lambda: hostile("fp16", lambda e: e.update(nbytes=1024), lambda p: p + p), r"nbytes 1024 for fp16 .* needs 512"),
    (lambda: hostile("int8", lambda e: e.update(dtype="int64"), t=torch.randn(4, 8)), r"dtype int64 is not carried by codec int8"),
    (lambda: hostile("topk", lambda e: e.update(dtype="bool"), t=torch.randn(4, 8)), r"dtype bool is not carried by codec topk"),
    (lambda: hostile("int8", None, put(256 + 4, F32(float("nan")))), r"int8 payload\.scales: scale 1 is nan; scales must be finite and non-negative"),
    (lambda: hostile("int8", None, put(256, F32(-0.5))), r"payload\.scales: scale 0 is -0.5"),
    (lambda: hostile({"name": "int8", "scales": "float16"}, None, put(256 + 6, F16(float("inf")))), r"payload\.scales: scale 3 is inf"),
    (lambda: hostile("int4", None, put(2, F16(float("-inf")))), r"int4 payload\.scales: scale 1 is -inf"),
    (lambda: hostile("int8", None, put(17, b"\x80")), r"int8 payload\.levels: level -128 is outside \[-127, 127\]"),
    (lambda: hostile("int4", None, put(16 + 5, b"\x08")), r"int4 payload\.levels: level -8 is outside \[-7, 7\]"),
    (lambda: hostile("topk", None, put(25 * 4, I32(256))), r"topk payload\.indices: index 256 is outside \[0, 256\)"),
    (lambda: hostile("topk", None, put(0, I32(-1))), r"payload\.indices: index -1 is outside"),
    (lambda: hostile("topk", None, put(4, I32(0, 0))), r"payload\.indices: indices must be strictly increasing \(none repeated, sorted\)"),
    (lambda: hostile("topk", None, put(0, I32(9, 3))), r"payload\.indices: indices must be strictly increasing"),
])
def test_hostile_frames_are_refused_naming_the_field(frame, reason):
    with pytest.raises(FrameError, match="tensor 'h': (.* )?" + reason):
        decode_frame(frame())


def test_a_tiny_sparse_frame_cannot_ask_for_a_huge_tensor():
    frame = hostile("topk", lambda e: e.update(shape=[1 << 29, 4], params={"k": 0}, nbytes=0), lambda p: b"")
    with pytest.raises(FrameError, match="tensor 'h': the frame's tensors would take more than 4294967296 bytes decoded"):
        decode_frame(frame)
    with pytest.raises(FrameError, match="more than 1000 bytes decoded"):
        decode_frame(one(torch.randn(300), "topk"), FrameLimits(max_decoded_bytes=1000))


def test_frames_are_checked_whole_before_any_tensor_is_built(monkeypatch):
    msg = Message("activations", "s", 1, 0, {"a": torch.randn(4, 8), "b": torch.randn(4, 8)})
    header, payload = parts(encode_frame(msg, {"a": "int8", "b": "int4"}))
    header["tensors"][1]["params"]["group"] = 7
    built = []
    monkeypatch.setattr(CODECS["int8"], "decode", lambda self, *a: built.append(a))
    with pytest.raises(FrameError, match="tensor 'b': int4 params.group = 7"):
        decode_frame(rebuild(header, payload))
    assert built == []


# -- fuzz ----------------------------------------------------------------------------------------------------
def test_fuzzed_frames_of_every_codec_raise_only_frame_errors(mutate):
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    templates = []
    for spec in SPECS:
        for t in (torch.randn(3, 40, generator=gen), torch.randn(70, generator=gen).bfloat16(), torch.zeros(0, 4)):
            msg = Message("activations", "s", 1, 0, {"h": t, "mask": torch.ones(3, dtype=torch.long)}, {"train": True})
            templates.append(encode_frame(msg, {"h": spec}))
    values = [None, True, -1, 0, 1, 7, 32, 64, 2**31, 2**63, -2**63, 1.5, float("nan"), "float16", "float32", "", b"\0", [], [1], {}, {"k": 1}]
    counts = {"ok": 0, "refused": 0}
    for i in range(3000):
        frame = bytearray(rng.choice(templates))
        if i % 3 == 0:  # structured: a random header value in a random place
            header, payload = parts(bytes(frame))
            entry = rng.choice(header["tensors"])
            where = rng.choice(["params", "params", "shape", "nbytes", "dtype", "codec"])
            if where == "params":
                entry["params"][rng.choice(["k", "group", "scales", "stochastic", "x"])] = rng.choice(values)
            elif where == "shape":
                entry["shape"] = [rng.choice([0, 1, 3, 40, 70, 2**20]) for _ in range(rng.randint(0, 3))]
            elif where == "codec":
                entry["codec"] = rng.choice(list(CODECS) + values[:4])
            else:
                entry[where] = rng.choice(values + ["int64", "bool", "bfloat16"])
            frame = bytearray(rebuild(header, payload))
        frame = mutate(frame, rng, rng.randint(1 if i % 3 else 0, 6), 32)  # flip, cut or grow
        try:
            decode_frame(bytes(frame) if i % 2 else frame)
            counts["ok"] += 1
        except FrameError as err:
            counts["refused"] += 1
            assert "could not decode" not in str(err), err  # every refusal is an explicit check, not a caught crash
    assert counts["refused"] > 1500 and counts["ok"] > 50, counts
