"""Wire codec speed and loss: encode_frame / decode_frame of one activation tensor per codec.

    .venv/bin/python benchmarks/codecs.py [--reps 60] [--shape 4 128 576]

One thread (torch.set_num_threads(1)) for every codec; repetitions are interleaved across codecs (so a
noisy neighbour slows all of them alike) and reported as the median with the 10th-90th percentile spread.
GB/s are of the float32 input tensor (bytes of the tensor / time). Decode is timed from ``bytes`` (what a
socket hands over: each payload is copied once) and from a ``bytearray`` (raw payloads are shared).
The loss table uses a realistic activation: randn with a few outlier channels, as in transformer
residual streams.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from splittune.wire import Message, decode_frame, encode_frame, make_codec

CODECS = [
    "raw", "fp16", "bf16", "int8", {"name": "int8", "scales": "float16"}, {"name": "int8", "stochastic": True},
    "int4", {"name": "int4", "group": 64}, "topk", {"name": "topk", "fraction": 0.01},
]


def label(spec) -> str:
    c = make_codec(spec)
    extra = [f"{k}={v}" for k, v in c.opts.items() if v != type(c).options[k].default]
    return c.name + (f"({', '.join(extra)})" if extra else "")


def activation(shape, outliers: int = 6, scale: float = 40.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    channels = torch.randperm(shape[-1], generator=g)[:outliers]
    x[..., channels] *= scale
    return x


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--shape", type=int, nargs="+", default=[4, 128, 576])
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = activation(tuple(args.shape))
    size = x.numel() * x.element_size()
    msgs = {label(s): (make_codec(s), Message("activations", "s", 1, 0, {"hidden": x})) for s in CODECS}
    times = {name: {"enc": [], "dec": [], "dec_ba": []} for name in msgs}
    gen = torch.Generator().manual_seed(1)
    for rep in range(args.reps + 3):
        for name, (codec, msg) in msgs.items():
            t0 = time.perf_counter()
            frame = encode_frame(msg, {"hidden": codec}, generator=gen)
            t1 = time.perf_counter()
            decode_frame(frame)
            t2 = time.perf_counter()
            writable = bytearray(frame)
            t3 = time.perf_counter()
            decode_frame(writable)
            t4 = time.perf_counter()
            if rep >= 3:  # warm-up
                times[name]["enc"].append(t1 - t0)
                times[name]["dec"].append(t2 - t1)
                times[name]["dec_ba"].append(t4 - t3)

    print(f"tensor float32{list(x.shape)} = {size / 1e6:.2f} MB, {args.reps} interleaved reps, 1 thread; "
          "GB/s of the float32 input: median [p10-p90]")
    print(f"{'codec':<26}{'encode ms':>10}{'encode GB/s':>20}{'decode ms':>10}{'decode GB/s':>20}{'decode(bytearray) GB/s':>26}")
    for name, t in times.items():
        cells = []
        for key in ("enc", "dec", "dec_ba"):
            med = statistics.median(t[key])
            rate = f"{size / med / 1e9:.2f} [{size / pct(t[key], 0.9) / 1e9:.2f}-{size / pct(t[key], 0.1) / 1e9:.2f}]"
            cells.append((med * 1e3, rate))
        print(f"{name:<26}{cells[0][0]:>10.3f}{cells[0][1]:>20}{cells[1][0]:>10.3f}{cells[1][1]:>20}{cells[2][1]:>26}")

    print()
    print(f"{'codec':<26}{'frame bytes':>12}{'payload':>10}{'ratio':>8}{'rel L2 err':>12}{'max |err|':>12}")
    for name, (codec, msg) in msgs.items():
        frame = encode_frame(msg, {"hidden": codec}, generator=gen)
        back = decode_frame(frame).tensors["hidden"]
        hlen = int.from_bytes(frame[4:8], "little")
        payload = len(frame) - 8 - hlen
        err = back - x
        print(f"{name:<26}{len(frame):>12}{payload:>10}{size / payload:>8.2f}{float(err.norm() / x.norm()):>12.2e}{float(err.abs().max()):>12.3g}")


if __name__ == "__main__":
    main()
