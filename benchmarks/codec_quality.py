"""What each codec costs in quality: the same run (the builtin model and text, U-shape, 40 steps) with every
codec on both directions; eval loss after, bytes each way, and each direction's mean relative codec error.

    .venv/bin/python benchmarks/codec_quality.py [--steps 40] [--out runs/codec-quality] [--codecs raw bf16 int8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from splittune.config import load_config
from splittune.run import train

CODECS = {"raw": "raw", "bf16": "bf16", "int8": "int8", "int4": "int4", "topk": "{name: topk, fraction: 0.1}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("runs/codec-quality"))
    ap.add_argument("--codecs", nargs="*", default=list(CODECS))
    args = ap.parse_args()
    results = {}
    for name in args.codecs:
        spec = CODECS[name]
        cfg = load_config(None, [f"train.steps={args.steps}", f"codec.up={spec}", f"codec.down={spec}"])
        s = train(cfg, args.out / name)
        results[name] = {k: s.get(k) for k in ("eval_loss_before", "eval_loss_after", "bytes_up", "bytes_down",
                                                 "codec_error_up", "codec_error_down", "step_s_median")}
        print(name, json.dumps(results[name]), flush=True)
    raw = results.get("raw")
    print(f"{'codec':<6} {'eval loss after':>15} {'vs raw':>8} {'bytes up':>12} {'bytes down':>12} {'err up':>9} {'err down':>9}")
    for name, r in results.items():
        rel = f"{(r['eval_loss_after'] / raw['eval_loss_after'] - 1) * 100:+.2f}%" if raw else ""
        err = lambda v: f"{v:.2e}" if v is not None else "-"  # noqa: E731
        print(f"{name:<6} {r['eval_loss_after']:15.4f} {rel:>8} {r['bytes_up']:12,d} {r['bytes_down']:12,d} "
              f"{err(r['codec_error_up']):>9} {err(r['codec_error_down']):>9}")
    (args.out / "codec-quality.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
