"""A profile from the config alone (``--estimate``): no weights load, so it works for a model too large for
this machine. Compute is counted in FLOPs at a throughput measured with about a second of matrix
products here, plus a fixed cost per block for the many small operations a block also runs; memory
follows what a decoder block keeps for backward (the measured profile is the reference: these formulas
came within ~10% of it on tiny llama-like models, and are rougher for other layouts).
"""

from __future__ import annotations

import time

import torch

from ..config import RunConfig
from ..models.partition import DTYPES
from .fit import Fit, Profile
from .sizes import ITEMSIZE

OPS_FWD, OPS_BWD = 40, 80  # small operations a block runs forward and backward, each paying the dispatch overhead


def throughput(device: torch.device, dtype: str, seconds: float = 1.0) -> float:
    """FLOP/s of square matrix products on ``device`` in ``dtype``, over about ``seconds``."""
    n = 1024 if device.type != "cpu" else 512
    a = torch.randn(n, n, device=device).to(DTYPES[dtype])
    b = torch.randn(n, n, device=device).to(DTYPES[dtype])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.type == "cuda" and count % 16:
            continue
        sync()
    sync()
    return 2 * n**3 * count / (time.perf_counter() - start)


def op_overhead(device: torch.device, reps: int = 2000) -> float:
    """Seconds one tiny operation costs (dispatch, allocation): what dominates small blocks."""
    x = torch.ones(8, device=device)
    start = time.perf_counter()
    for _ in range(reps):
        x = x + 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def adamw_seconds_per_param(device: torch.device, count: int = 1 << 20) -> float:
    p = torch.nn.Parameter(torch.zeros(count, device=device))
    p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW([p])
    opt.step()
    start = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / count


def estimate_profile(run: RunConfig, compute: torch.device, **common) -> Profile:
    sizes, threads, device = common["sizes"], common["threads"], compute
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flops, op_s, adam = throughput(device, run.train.dtype), op_overhead(device), adamw_seconds_per_param(device)
    finally:
        torch.set_num_threads(before)
    w, f, v, seq = sizes.width, sizes.ffn, sizes.vocab, run.train.seq_len
    item = ITEMSIZE[run.train.dtype]
    attention = 4 * seq * w  # QKᵀ and AV per token (full attention)
    fwd = 2 * sizes.block_params + attention
    bwd_lora = 2 * sizes.block_params + 2 * attention  # gradients of the inputs (and the small LoRA factors)
    bwd_full = 4 * sizes.block_params + 2 * attention  # and of every weight
    head = 2 * v * w
    logits = 3 * 4 * v + (v * item if item != 4 else 0)  # fp32 logits, log-softmax, their gradient (and the dtype's logits)
    return Profile(
        modes=("full", "lora"),
        block_fwd={"lora": Fit(OPS_FWD * op_s, fwd / flops), "full": Fit(OPS_FWD * op_s, fwd / flops)},
        block_bwd={"lora": Fit(OPS_BWD * op_s, bwd_lora / flops), "full": Fit(OPS_BWD * op_s, bwd_full / flops)},
        segment_fwd=Fit(OPS_FWD * op_s, 0.0), head_fwd=Fit(10 * op_s, head / flops), head_bwd=Fit(10 * op_s, head / flops),
        optimizer_s=adam,
        block_saved={m: Fit(0.0, (7 * w + 4 * f) * item) for m in ("lora", "full")}, shared_saved=Fit(),
        head_peak=Fit(0.0, logits), block_peak=Fit(0.0, (2 * f + 2 * w) * item), trainable_itemsize=4,
        eval_peak=Fit(0.0, logits * 2 / 3),  # no gradient of the logits
        estimated=True, **{**common, "notes": [*common["notes"], f"estimated from the config: {flops / 1e9:.0f} GFLOP/s measured "
                                                "here, no weights loaded"]})
